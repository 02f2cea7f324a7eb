"""Prometheus metrics: the HTTP endpoint parses as Prometheus text and moves as tokens are generated;
per-op metrics are off (and cost nothing) by default; every metric the Grafana dashboard queries exists;
a constructor that fails leaves no server behind; a caller's server outlives the batcher and can linger."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import hal
from hal.cli import main
from hal.model import DeepseekModel
from hal.model.config import ModelConfig
from hal.serving import Failover, HealthBook, MetricsUnavailableError, Request
from hal.serving.metrics import METRIC_NAMES, ServingMetrics, parse_listen_address
from tests.serving.conftest import FLAKY_THEN_CPU, cpu_registry, flaky_registry, prompts_for

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"


def scrape(port: int) -> list[Sample]:
    """Every sample of ``/metrics``, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def test_the_endpoint_parses_and_moves_as_tokens_are_generated(model: DeepseekModel) -> None:
    prompts = prompts_for(4, model.cfg.vocab_size)
    with hal.AutoBatcher(model, max_batch_size=4, timeout_ms=20, num_blocks=8, metrics_port=0) as batcher:
        port = batcher.metrics_port
        assert port is not None and port > 0
        before = scrape(port)
        assert value(before, "hal_generated_tokens_total") == 0
        assert value(before, "hal_requests_total", outcome="finished") == 0
        assert value(before, "hal_kv_cache_blocks_total") == 8

        batcher.process(prompts, max_new_tokens=6)
        stats = batcher.stats()
        after = scrape(port)
        assert value(after, "hal_generated_tokens_total") == 4 * 6 == stats.generated_tokens
        assert value(after, "hal_prompt_tokens_total") == sum(len(p) for p in prompts)
        assert value(after, "hal_requests_total", outcome="finished") == 4
        assert value(after, "hal_request_latency_seconds_count") == 4
        assert value(after, "hal_time_to_first_token_seconds_count") == 4
        assert value(after, "hal_request_queue_seconds_count") == 4
        assert value(after, "hal_batch_size_count", phase="decode") == stats.decode_steps
        assert value(after, "hal_batch_size_sum", phase="decode") == stats.decode_tokens
        assert value(after, "hal_batch_size_count", phase="prefill") == stats.prefill_calls
        assert value(after, "hal_tokens_per_second") > 0
        assert value(after, "hal_kv_cache_blocks_used") == 0  # every sequence finished and freed its blocks
        assert value(after, "hal_requests_running") == 0 and value(after, "hal_requests_waiting") == 0
        assert value(after, "hal_serving_backend_info", backend="cpu", device="cpu") == 1
        assert value(after, "hal_device_memory_bytes", backend="cpu", device="cpu", kind="allocated") > 0
        assert value(after, "hal_device_healthy", backend="cpu", device="cpu") == 1

        batcher.submit(prompts[0], 3).result(timeout=30)
        assert value(scrape(port), "hal_generated_tokens_total") == 4 * 6 + 3
    with pytest.raises(urllib.error.URLError):  # closing the batcher stops its server
        scrape(port)


def test_per_op_metrics_are_off_by_default_and_cost_nothing(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    backend = cpu_registry().get_backend("cpu")  # its own backend: instrumenting it touches nothing shared
    model = DeepseekModel(cfg, backend, weights)
    prompts = prompts_for(2, cfg.vocab_size)
    with hal.AutoBatcher(model, max_batch_size=2, num_blocks=4, metrics=True) as batcher:
        batcher.process(prompts, max_new_tokens=3)
        # The model calls the op table's own callables: nothing wraps them, no flag is tested per call.
        assert all(getattr(backend, op) is entry.fn for op, entry in backend.table.items())
        text = batcher.metrics.exposition() if batcher.metrics else ""
    assert "hal_op_latency_seconds" not in text

    with hal.AutoBatcher(model, max_batch_size=2, num_blocks=4, op_metrics=True) as batcher:
        assert backend.gemm is not backend.table["gemm"].fn  # wrapped while enabled
        batcher.process(prompts, max_new_tokens=3)
        samples = [
            s
            for f in text_string_to_metric_families(batcher.metrics.exposition() if batcher.metrics else "")
            for s in f.samples
        ]
    # One histogram per op: its _count is the call count.
    assert value(samples, "hal_op_latency_seconds_count", backend="cpu", op="gemm") > 0
    assert value(samples, "hal_op_latency_seconds_sum", backend="cpu", op="gemm") > 0
    assert value(samples, "hal_op_latency_seconds_count", backend="cpu", op="mla_decode") > 0
    assert not any(s.name.startswith("hal_op_calls") for s in samples)
    assert all(getattr(backend, op) is entry.fn for op, entry in backend.table.items())  # restored on close


def test_metrics_live_in_their_own_registry(model: DeepseekModel) -> None:
    a, b = ServingMetrics(), ServingMetrics()  # a global registry would refuse the second set of names
    a.observe_tokens(5)
    assert "hal_generated_tokens_total 5.0" in a.exposition()
    assert "hal_generated_tokens_total 0.0" in b.exposition()
    assert "hal_" not in generate_latest(REGISTRY).decode()  # the process-global registry is untouched


def test_cancelled_queued_requests_leave_the_waiting_gauge(model: DeepseekModel) -> None:
    # Cancelled in the batching window, before any step: no later step refreshes the gauges, close() must.
    metrics = ServingMetrics()
    batcher = hal.AutoBatcher(model, max_batch_size=8, timeout_ms=60_000, num_blocks=4, metrics=metrics)
    futures = [batcher.submit([1, 2, 3], 4) for _ in range(3)]
    assert "hal_requests_waiting 3.0" in metrics.exposition().splitlines()
    batcher.close(cancel_pending=True)
    assert all(f.cancelled() for f in futures)
    lines = metrics.exposition().splitlines()
    assert "hal_requests_waiting 0.0" in lines and 'hal_requests_total{outcome="cancelled"} 3.0' in lines


def test_a_missing_prometheus_client_names_the_extra(model: DeepseekModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # what `import` sees when it is not installed
    with pytest.raises(MetricsUnavailableError, match=r"pip install 'hal-accel\[metrics\]'"):
        ServingMetrics()
    with pytest.raises(MetricsUnavailableError):
        hal.AutoBatcher(model, num_blocks=2, metrics_port=0)
    # Without metrics nothing needs prometheus-client.
    with hal.AutoBatcher(model, num_blocks=2) as batcher:
        assert batcher.metrics is None and len(batcher.submit([1, 2, 3], 2).result(timeout=30).tokens) == 2


def _dashboard_queries() -> Iterator[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("expr", "query", "definition") and isinstance(item, str):
                    yield item
                else:
                    yield from walk(item)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return walk(json.loads(DASHBOARD.read_text()))


def test_every_metric_the_dashboard_queries_exists_in_the_exposition(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    queried = {name for q in _dashboard_queries() for name in re.findall(r"\bhal_[a-z0-9_]+\b", q)}
    assert len(queried) >= 15
    # A run that exercises everything: per-op metrics on and a failover, so every family has samples.
    registry, _ = flaky_registry(300)
    failover = Failover(
        lambda be: DeepseekModel(cfg, be, weights), registry=registry, backends=FLAKY_THEN_CPU, book=HealthBook()
    )
    with hal.AutoBatcher(failover.build(), failover=failover, num_blocks=4, metrics_port=0, op_metrics=True) as b:
        b.process([Request(p, 6) for p in prompts_for(3, cfg.vocab_size)])
        assert b.metrics_port is not None and len(b.failovers) == 1
        exposed = {s.name for s in scrape(b.metrics_port)}
    assert sorted(queried - exposed) == []
    # And the documented list is what is exposed (counters carry _total, histograms _bucket/_sum/_count).
    for name in METRIC_NAMES:
        assert name in exposed or f"{name}_count" in exposed, name


def test_hal_run_with_a_metrics_port_gives_the_tokens_of_generate(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--max-new-tokens", "4", "--batch", "3", "--json", "-q", "--no-warmup"]
    for sampling in ([], ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]):
        assert main([*args, *sampling]) == 0
        plain = json.loads(capsys.readouterr().out)
        assert main([*args, *sampling, "--metrics-port", "127.0.0.1:0"]) == 0
        batched = json.loads(capsys.readouterr().out)
        assert batched["tokens"] == plain["tokens"] and batched["decode_tokens_per_s"] > 0, sampling
        assert batched["metrics_port"] > 0  # the port bound, not the 0 asked for
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--metrics-port", "http"])
    assert exit_info.value.code == 2
    assert "expected [ADDR:]PORT" in capsys.readouterr().err
    assert main(["run", "--metrics-linger", "5"]) == 1
    assert "go with --metrics-port" in capsys.readouterr().err


def test_hal_run_serves_metrics_until_it_ends_and_lingers(capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    argv = ["run", "--max-new-tokens", "4", "--batch", "3", "--json", "-q", "--no-warmup"]
    argv += ["--metrics-port", f"127.0.0.1:{port}", "--metrics-linger", "2"]
    codes: list[int] = []
    run = threading.Thread(target=lambda: codes.append(main(argv)))
    run.start()
    final: list[Sample] = []
    deadline = time.monotonic() + 60
    while run.is_alive() and time.monotonic() < deadline:  # scrape as Prometheus would, until the end
        try:
            samples = scrape(port)
        except urllib.error.URLError:
            samples = []
        if samples and value(samples, "hal_requests_total", outcome="finished") == 3:
            final = samples
            break
        time.sleep(0.02)
    run.join(timeout=60)
    assert codes == [0] and json.loads(capsys.readouterr().out)["metrics_port"] == port
    assert final, "the final values were never scraped"
    assert value(final, "hal_generated_tokens_total") == 3 * 4
    with pytest.raises(urllib.error.URLError):  # the server stopped after the linger
        scrape(port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_constructor_that_fails_leaves_no_server_and_no_wrapped_ops(
    cfg: ModelConfig, weights: dict[str, Any]
) -> None:
    backend = cpu_registry().get_backend("cpu")
    model = DeepseekModel(cfg, backend, weights)
    with hal.AutoBatcher(model, num_blocks=4, op_metrics=True):
        port = _free_port()
        # The backend's ops are wrapped by the first batcher: the second one's constructor fails ...
        with pytest.raises(hal.serving.ServingError, match="already wrapped"):
            hal.AutoBatcher(model, num_blocks=4, op_metrics=True, metrics_port=port)
        assert _port_is_free(port)  # ... and leaves no server bound
    assert all(getattr(backend, op) is entry.fn for op, entry in backend.table.items())


def test_op_metrics_with_a_caller_s_serving_metrics_is_honoured_or_refused(
    cfg: ModelConfig, weights: dict[str, Any]
) -> None:
    model = DeepseekModel(cfg, cpu_registry().get_backend("cpu"), weights)  # its own backend, wrapped below
    with pytest.raises(ValueError, match=r"ServingMetrics\(op_metrics=True\)"):
        hal.AutoBatcher(model, num_blocks=4, metrics=ServingMetrics(), op_metrics=True)
    metrics = ServingMetrics(op_metrics=True)
    with hal.AutoBatcher(model, num_blocks=4, metrics=metrics, op_metrics=True) as batcher:
        batcher.submit([1, 2, 3], 2).result(timeout=30)
    samples = [s for f in text_string_to_metric_families(metrics.exposition()) for s in f.samples]
    assert value(samples, "hal_op_latency_seconds_count", backend="cpu", op="gemm") > 0


def test_a_caller_s_server_outlives_the_batcher_and_lingers_on_close(model: DeepseekModel) -> None:
    metrics = ServingMetrics()
    port = metrics.serve(0)
    assert port > 0 and metrics.port == port
    with hal.AutoBatcher(model, num_blocks=4, metrics=metrics) as batcher:
        assert batcher.metrics is metrics and batcher.metrics_port is None  # the server is the caller's
        batcher.submit([1, 2, 3], 2).result(timeout=30)
    assert value(scrape(port), "hal_generated_tokens_total") == 2  # still served after the batcher closed
    closer = threading.Thread(target=metrics.close, kwargs={"linger_s": 1.0})
    closer.start()
    time.sleep(0.1)
    assert value(scrape(port), "hal_generated_tokens_total") == 2  # lingering: the final values are scraped
    closer.join(timeout=30)
    assert metrics.port is None
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with pytest.raises(ValueError, match="linger_s"):
        metrics.close(linger_s=-1)


def test_parse_listen_address() -> None:
    assert parse_listen_address("9400") == ("127.0.0.1", 9400)
    assert parse_listen_address("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    for bad in ("", "x", "1:70000", "host:"):
        with pytest.raises(ValueError, match=r"\[ADDR:\]PORT"):
            parse_listen_address(bad)
