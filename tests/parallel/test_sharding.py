"""The parallel layout in one process (:mod:`hal.model.parallel`): which combinations run, what each rank
keeps of each weight (the shards put together are the whole weights again), FP8 / INT8 shards and their
scales, the loader reading only a rank's slices, and the errors (a misaligned FP8 split, sizes that do
not divide, ``--tp`` without torchrun)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hal.cli import main
from hal.model import tiny_config
from hal.model.config import ModelConfig
from hal.model.loader import load_weights, quantize_linear, save_fp8_checkpoint
from hal.model.parallel import (
    DROP,
    ParallelConfig,
    ParallelError,
    Split,
    init_parallel,
    local_shapes,
    quantized_to_fp8,
    shard_state_dict,
    shard_weight,
    split_for,
)
from hal.model.weights import Fp8Weight, Int8Weight, Weight, expected_shapes, random_state_dict

LAYOUTS = {"tp2": (2, 1), "ep2": (1, 2), "tp2-ep2": (2, 2)}

# A small config whose tp = 2 splits all fall on FP8 128-blocks: q_b rows 4 heads x 128 (2 x 256), kv_b
# rows 4 x 128, o_proj columns 4 x 64 (2 x 128), dense intermediate 512, expert intermediate 256.
ALIGNED_RAW = {
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "max_position_embeddings": 256,
}


def _ranks(tp: int, ep: int) -> list[ParallelConfig]:
    return [ParallelConfig.create(tp, ep, rank=r, world_size=max(tp, ep)) for r in range(max(tp, ep))]


def _join(shards: list[Weight], dim: int) -> Weight:
    if isinstance(shards[0], Fp8Weight):
        fp8 = [s for s in shards if isinstance(s, Fp8Weight)]
        return Fp8Weight(torch.cat([s.q for s in fp8], dim), torch.cat([s.scale for s in fp8], dim))
    if isinstance(shards[0], Int8Weight):
        int8 = [s for s in shards if isinstance(s, Int8Weight)]
        scales = torch.cat([s.scale for s in int8]) if dim == 0 else int8[0].scale
        return Int8Weight(torch.cat([s.q for s in int8], dim), scales)
    return torch.cat([s for s in shards if isinstance(s, torch.Tensor)], dim)


def _same(a: Weight, b: Weight) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (Fp8Weight, Int8Weight)) and type(a) is type(b):
        assert isinstance(b, (Fp8Weight, Int8Weight))
        return torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8)) and torch.equal(a.scale, b.scale)
    return False


def _check_reassembles(full: dict[str, Weight], cfg: ModelConfig, tp: int, ep: int) -> None:
    """Every rank's shards, put together, are ``full``: split weights concatenate back, replicated ones
    are equal on every rank, and every routed expert is on exactly one rank."""
    ranks = _ranks(tp, ep)
    shards = [shard_state_dict(full, cfg, par) for par in ranks]
    for par, local in zip(ranks, shards, strict=True):
        assert {k: tuple(v.shape) for k, v in local.items()} == local_shapes(cfg, par)
    for name, w in full.items():
        holders = [s[name] for s in shards if name in s]
        split = split_for(name, tuple(w.shape), cfg, ranks[0])
        if ".experts." in name and ep > 1:
            assert len(holders) == 1, name
            assert _same(holders[0], w), name
        elif isinstance(split, Split):
            assert len(holders) == tp and all(h.shape[split.dim] == w.shape[split.dim] // tp for h in holders)
            assert _same(_join(holders, split.dim), w), name
        else:
            assert len(holders) == len(ranks) and all(_same(h, w) for h in holders), name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shards_reassemble_the_full_weights(layout: str) -> None:
    cfg = tiny_config()
    _check_reassembles(dict(random_state_dict(cfg, seed=3)), cfg, *LAYOUTS[layout])


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_quantized_shards_reassemble_with_their_scales(mode: str) -> None:
    cfg = ModelConfig.from_dict(ALIGNED_RAW)
    full: dict[str, Weight] = {}
    for name, w in random_state_dict(cfg, seed=1).items():
        q = quantize_linear(w, mode) if name.endswith("proj.weight") else None
        full[name] = w if q is None else q
    assert any(isinstance(w, Fp8Weight if mode == "fp8" else Int8Weight) for w in full.values())
    _check_reassembles(full, cfg, 2, 1)
    _check_reassembles(full, cfg, 2, 2)


def test_what_each_weight_splits_by() -> None:
    cfg = tiny_config()  # 4 heads of qk 64 / v 32, hidden 256, intermediate 512, moe 128, 16 experts
    shapes = expected_shapes(cfg)
    r1 = ParallelConfig.create(2, 2, rank=1, world_size=2)

    def split(name: str) -> Split | str | None:
        return split_for(name, shapes[name], cfg, r1)

    assert split("model.layers.0.self_attn.q_b_proj.weight") == Split(0, 128, 256, 2)  # heads 2, 3
    assert split("model.layers.0.self_attn.kv_b_proj.weight") == Split(0, 128, 256, 2)
    assert split("model.layers.0.self_attn.o_proj.weight") == Split(1, 64, 128, 2)
    assert split("model.layers.0.mlp.gate_proj.weight") == Split(0, 256, 512, 2)
    assert split("model.layers.0.mlp.down_proj.weight") == Split(1, 256, 512, 2)
    assert split("model.layers.1.mlp.shared_experts.up_proj.weight") == Split(0, 64, 128, 2)
    assert split("lm_head.weight") == Split(0, 512, 1024, 2)
    for replicated in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                       "model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "model.norm.weight"):  # fmt: skip
        assert split(replicated) is None, replicated
    assert split("model.layers.1.mlp.experts.8.gate_proj.weight") is None  # rank 1 owns experts 8..15
    assert split("model.layers.1.mlp.experts.7.gate_proj.weight") == DROP
    # tp 2 without ep: every expert on every rank, split like the dense MLP.
    tp_only = ParallelConfig.create(2, 1, rank=0, world_size=2)
    assert split_for("model.layers.1.mlp.experts.7.down_proj.weight", (256, 128), cfg, tp_only) == Split(1, 0, 64, 2)


def test_misaligned_fp8_split_names_the_weight_and_dimension() -> None:
    w = quantize_linear(torch.randn(256, 256), "fp8")
    assert isinstance(w, Fp8Weight)
    with pytest.raises(
        ParallelError, match=r"o_proj\.weight: splitting its columns \(input features\) \(256\) into 4 parts of 64"
    ):
        shard_weight("o_proj.weight", w, Split(1, 64, 128, 4))
    with pytest.raises(ParallelError, match=r"rows \(output features\)"):
        shard_weight("q_b_proj.weight", w, Split(0, 192, 256, 4))
    # The tiny model's o_proj (4 heads x 32 = 128 columns) cannot be split in two FP8 blocks.
    cfg = tiny_config()
    full = {k: (quantize_linear(v, "fp8") or v) if k.endswith("o_proj.weight") else v
            for k, v in random_state_dict(cfg).items()}  # fmt: skip
    with pytest.raises(ParallelError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight: .*columns"):
        shard_state_dict(full, cfg, ParallelConfig.create(2, 1, rank=0, world_size=2))
    # On the block grid it works, scales cut along.
    half = shard_weight("w", w, Split(0, 128, 256, 2))
    assert isinstance(half, Fp8Weight) and half.q.shape == (128, 256) and half.scale.shape == (1, 2)


@pytest.mark.parametrize(
    ("tp", "ep", "world", "match"),
    [
        (3, 1, 2, r"--tp 3 on 2 process\(es\): --tp must be 1 or the world size \(2\)"),
        (1, 4, 2, r"--ep 4 on 2 process"),
        (1, 1, 2, r"2 processes but --tp 1 --ep 1"),
    ],
)
def test_layouts_that_cannot_run(tp: int, ep: int, world: int, match: str) -> None:
    with pytest.raises(ParallelError, match=match):
        ParallelConfig.create(tp, ep, rank=0, world_size=world)


def test_layout_rules() -> None:
    with pytest.raises(ParallelError, match="must be equal"):
        ParallelConfig(tp=2, ep=4)
    assert ParallelConfig.create(2, 2, rank=1, world_size=2).local_experts(tiny_config()) == range(8, 16)
    one = ParallelConfig()
    assert (one.world_size, one.local_experts(tiny_config()), one.token_range(5)) == (1, range(16), (0, 5))
    last = ParallelConfig.create(1, 2, rank=1, world_size=2)
    assert [last.token_range(n) for n in (0, 1, 5)] == [(0, 0), (1, 1), (3, 5)]
    with pytest.raises(ParallelError, match=r"num_attention_heads \(4\) is not a multiple of 8"):
        ParallelConfig.create(8, 1, rank=0, world_size=8).check(tiny_config())
    with pytest.raises(ParallelError, match=r"n_routed_experts \(16\) is not a multiple of 3"):
        ParallelConfig.create(1, 3, rank=0, world_size=3).check(tiny_config())


def test_init_parallel_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import hal

    be = hal.get_backend("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_parallel(1, 1, be) is None
    with pytest.raises(ParallelError, match=r"torchrun --nproc-per-node 2 -m hal.cli run --tp 2"):
        init_parallel(2, 1, be)
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any rendezvous is attempted
    with pytest.raises(ParallelError, match="--tp 1 --ep 1"):
        init_parallel(1, 1, be)
    with pytest.raises(ParallelError, match=r"--tp 4 on 2"):
        init_parallel(4, 1, be)


def test_hal_run_tp_without_torchrun_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["run", "--tp", "2", "--ep", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "hal run: error: --tp 2 --ep 2 runs on 2 processes started by torchrun" in err
    assert "torchrun --nproc-per-node 2 -m hal.cli run --tp 2 --ep 2" in err
    # A layout the config cannot take is refused first (the tiny model has 4 heads), then bad values.
    assert main(["run", "--tp", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "hal run: error: " in err and "num_attention_heads" in err and "torchrun" not in err
    with pytest.raises(SystemExit):
        main(["run", "--tp", "abc"])
    assert "argument --tp: expected a positive int, got 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--max-new-tokens", "abc"])
    assert "argument --max-new-tokens: expected an int >= 0, got 'abc'" in capsys.readouterr().err
    # A combination no world size can run is refused as such, not with a torchrun command line.
    assert main(["run", "--tp", "2", "--ep", "3"]) == 1
    err = capsys.readouterr().err
    assert "--tp 2 --ep 3: each is 1 or the world size, so two above 1 must be equal" in err


def test_a_bad_timeout_under_torchrun_is_refused_once_before_the_rendezvous(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("HAL_DIST_TIMEOUT", "abc")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(["run", "--tp", "2", "--json", "-q"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("HAL_DIST_TIMEOUT") == 1  # rank 0 alone says it
    assert err.startswith("hal run: error: rank 0/2: ") and "expected a number of seconds, got 'abc'" in err


def _write_checkpoint(tmp_path: Path, raw: dict[str, object], weights: dict[str, torch.Tensor]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loader_reads_each_ranks_share(tmp_path: Path, layout: str) -> None:
    cfg = ModelConfig.from_dict(ALIGNED_RAW)
    full = random_state_dict(cfg, seed=2, dtype=torch.bfloat16)
    root = _write_checkpoint(tmp_path, ALIGNED_RAW, full)
    for par in _ranks(*LAYOUTS[layout]):
        got = load_weights(root, cfg, dtype=torch.bfloat16, progress=False, parallel=par)
        want = shard_state_dict(dict(full), cfg, par)
        assert list(got) == list(want)
        assert all(_same(got[k], want[k]) for k in want), [k for k in want if not _same(got[k], want[k])]


def test_loader_shards_fp8_checkpoints_and_quantize_at_load(tmp_path: Path) -> None:
    cfg = ModelConfig.from_dict(ALIGNED_RAW)
    full = random_state_dict(cfg, seed=4)
    root = save_fp8_checkpoint(full, ALIGNED_RAW, tmp_path / "fp8")
    plain = _write_checkpoint(tmp_path, ALIGNED_RAW, full)
    for par in _ranks(2, 2):
        whole = load_weights(root, cfg, progress=False)
        got = load_weights(root, cfg, progress=False, parallel=par)
        assert isinstance(got["model.layers.0.self_attn.o_proj.weight"], Fp8Weight)
        assert all(_same(got[k], v) for k, v in shard_state_dict(whole, cfg, par).items())
        # Quantized whole at load, then cut: INT8's per-row scales are those of one process.
        whole8 = load_weights(plain, cfg, quantize="int8", progress=False)
        got8 = load_weights(plain, cfg, quantize="int8", progress=False, parallel=par)
        assert all(_same(got8[k], v) for k, v in shard_state_dict(whole8, cfg, par).items())


def test_ep_without_routed_experts_is_refused_unless_tp_splits() -> None:
    ep_only = ParallelConfig.create(1, 2, rank=0, world_size=2)
    with pytest.raises(ParallelError, match=r"--ep 2: the model has no routed experts .* every rank would run"):
        ep_only.check(tiny_config(n_routed_experts=0))
    with pytest.raises(ParallelError, match=r"--ep 2: every layer is dense \(first_k_dense_replace 4 >= "):
        ep_only.check(tiny_config(first_k_dense_replace=4))
    ParallelConfig.create(2, 2, rank=0, world_size=2).check(tiny_config(first_k_dense_replace=4))  # tp splits


def test_fp8_alignment_is_checked_from_the_config_alone() -> None:
    tp2 = ParallelConfig.create(2, 1, rank=1, world_size=2)
    # The tiny model's o_proj (4 heads x 32 = 128 columns) and expert intermediate (128) are one block each.
    with pytest.raises(ParallelError, match=r"--tp 2 with FP8 weights: .*o_proj\.weight columns \(128\)") as err:
        tp2.check(tiny_config(), fp8=quantized_to_fp8)
    assert "128 is a single 128-block, so no --tp above 1 splits it" in str(err.value)
    assert "model.layers.*.mlp.experts.*.down_proj.weight columns (128)" in str(err.value)
    tp2.check(tiny_config())  # without FP8 weights every split is fine
    ParallelConfig.create(1, 2, rank=0, world_size=2).check(tiny_config(), fp8=quantized_to_fp8)  # nothing split
    aligned = ModelConfig.from_dict(ALIGNED_RAW)
    tp2.check(aligned, fp8=quantized_to_fp8)
    with pytest.raises(ParallelError, match=r"o_proj\.weight columns \(256\).*only a --tp that divides 2 \(2\)"):
        ParallelConfig.create(4, 1, rank=0, world_size=4).check(aligned, fp8=quantized_to_fp8)
    # Only the weights said to be FP8 count (an FP8 checkpoint's own list).
    tp2.check(tiny_config(), fp8=lambda name, shape: name.endswith("q_b_proj.weight"))
    # A misaligned cut found while sharding says the same.
    w = quantize_linear(torch.randn(128, 128), "fp8")
    assert isinstance(w, Fp8Weight)
    with pytest.raises(ParallelError, match=r"no --tp above 1 splits it on block boundaries\. Run with --tp 1"):
        shard_weight("o_proj.weight", w, Split(1, 64, 128, 2))


def test_a_group_must_match_the_layout() -> None:
    with pytest.raises(ParallelError, match=r"a group was given, but torch\.distributed is not initialized"):
        ParallelConfig(tp=2, rank=0, group=object())


@pytest.fixture
def two_ranks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torchrun's RANK / WORLD_SIZE without a rendezvous address: hal run gets as far as its own checks,
    and a run that passes them fails in hal.distributed.init without waiting."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    hal_logger = logging.getLogger("hal")
    level = hal_logger.level
    yield
    hal_logger.setLevel(level)  # rank 1 quiets it


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--tp", "2", "--quantize", "fp8"], "--tp 2 with FP8 weights: "),
        (["--tp", "2", "--metrics-port", "9"], "--metrics-port: serving metrics run in one process"),
        (["--ep", "2", "--quantize", "int8", "--dequantize-fp8"], "--dequantize-fp8: loads an FP8 checkpoint"),
        (["--tp", "2", "--top-p", "0"], "--top-p: top_p must lie in (0, 1]"),
        (["--tp", "3"], "--tp 3 on 2 process(es)"),
        (["--tp", "2", "--prompt-ids", "1,2;3,5000"], "--prompt-ids: prompt 1: token ids must lie in [0, 1024)"),
    ],
)
def test_hal_run_checks_before_the_rendezvous_and_rank_0_alone_says_it(
    args: list[str], match: str, two_ranks: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--backend", "cpu", "-q", *args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"hal run: error: rank 0/2: {match}") and err.count("error:") == 1, err
    monkeypatch.setenv("RANK", "1")
    assert main(["run", "--backend", "cpu", "-q", *args]) == 1
    assert capsys.readouterr() == ("", "")  # the same error on every rank: said once, by rank 0


def test_hal_run_checks_an_fp8_checkpoint_before_the_rendezvous(
    tmp_path: Path, two_ranks: None, capsys: pytest.CaptureFixture[str]
) -> None:
    narrow = {**ALIGNED_RAW, "v_head_dim": 32}  # o_proj: 4 heads x 32 = 128 columns, one FP8 block
    save_fp8_checkpoint(random_state_dict(ModelConfig.from_dict(narrow), seed=0), narrow, tmp_path / "narrow")
    assert main(["run", "--backend", "cpu", "-q", "--model", str(tmp_path / "narrow"), "--tp", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hal run: error: rank 0/2: --tp 2 with FP8 weights: ") and "o_proj.weight columns" in err
    aligned = ModelConfig.from_dict(ALIGNED_RAW)
    save_fp8_checkpoint(random_state_dict(aligned, seed=0), ALIGNED_RAW, tmp_path / "aligned")
    assert main(["run", "--backend", "cpu", "-q", "--model", str(tmp_path / "aligned"), "--tp", "2"]) == 1
    err = capsys.readouterr().err  # past every check: the rendezvous is what fails here (no MASTER_ADDR)
    assert err.startswith("hal run: error: rank 0/2: distributed.init: the environment lacks LOCAL_RANK"), err


def test_bind_local_device_binds_the_accelerator_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    import hal.distributed as hd
    from hal.errors import CollectiveError

    bound: list[tuple[str, int]] = []
    monkeypatch.setattr(hd, "_bind_device", lambda kind, local: bound.append((kind, local)))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert hd.bind_local_device() is None  # not under torchrun
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(CollectiveError, match="LOCAL_RANK must be an integer"):
        hd.bind_local_device()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert hd.bind_local_device() is None and bound == []  # a CPU-only machine
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    assert hd.bind_local_device() == "cuda" and bound == [("cuda", 1)]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(CollectiveError, match=r"LOCAL_RANK 2 but this process sees 2 cuda device"):
        hd.bind_local_device()
