"""Summarize repeated runs of ``test_collectives_bench.py`` into one results file (``bench/results/``).

Each run is one ``--benchmark-json`` file of pytest-benchmark. Per (op, shape) row the summary lists,
over the runs in the order given, the median call time of every implementation (``hal``, ``hal_ll``,
``baseline``, ``baseline_remote``), HAL's time over each baseline's within the same run, and the median
of those ratios over the runs, with the byte counts the benchmark records::

    for i in 1 2 3 4 5; do
        .venv/bin/python -m pytest bench/collectives/test_collectives_bench.py -q -k ep_ --benchmark-json=/tmp/q$i.json
        HAL_BENCH_SHAPES=deepseek-v3 .venv/bin/python -m pytest bench/collectives/test_collectives_bench.py -q \\
            -k ep_ --benchmark-json=/tmp/d$i.json
    done
    .venv/bin/python bench/collectives/summarize.py /tmp/q?.json /tmp/d?.json \\
        --out bench/results/ep-collectives-cpu.json --command "the loop above" --note "..."

Each row is summarized over the runs that hold it: the runs of its shape set, repeats of one another.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hal.bench.collectives import HAL_IMPLS, REMOTE_ROWS

#: Short names of the implementations in the summary's keys.
KEYS = {
    "hal": "hal",
    "hal-ll": "hal_ll",
    "torch.distributed.all_reduce": "baseline",
    "torch.distributed.all_to_all_single": "baseline",
    REMOTE_ROWS: "baseline_remote",
}


def _rows(run: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"op shape": {impl: extra_info + median}}`` of one pytest-benchmark file."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in run["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "op" not in info:
            continue
        if info["impl"] not in KEYS:
            raise SystemExit(f"summarize.py: unknown implementation {info['impl']!r}; known: {', '.join(KEYS)}")
        row = rows.setdefault(f"{info['op']} {info['shape']}", {})
        if info["impl"] in row:
            raise SystemExit(f"summarize.py: {info['op']} {info['shape']} {info['impl']} twice in one run")
        row[info["impl"]] = {
            **info,
            "median": bench["stats"]["median"],
        }
    return rows


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per (op, shape) found in any run, over the runs that hold it."""
    per_run = [_rows(r) for r in runs]
    names = sorted({name for rows in per_run for name in rows}, key=lambda n: (n.split()[0], n))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        held = [rows[name] for rows in per_run if name in rows]
        impls = list(held[0])
        if any(set(h) != set(impls) for h in held):
            raise SystemExit(f"summarize.py: {name}: the runs timed different implementations")
        row: dict[str, Any] = {}
        for impl in impls:
            row[f"{KEYS[impl]}_us"] = [round(h[impl]["median"] * 1e6) for h in held]
        for impl in impls:
            if "wire_bytes" in held[0][impl]:
                row[f"{KEYS[impl]}_wire_bytes"] = int(held[0][impl]["wire_bytes"])
        row["formula_bytes"] = int(held[0][impls[0]]["bytes"])
        for hal_impl in (i for i in impls if i in HAL_IMPLS):
            for base in (i for i in impls if i not in HAL_IMPLS):
                ratios = [h[hal_impl]["median"] / h[base]["median"] for h in held]
                key = f"{KEYS[hal_impl]}_over_{KEYS[base]}"
                row[key] = [round(r, 2) for r in ratios]
                row[f"median_{key}"] = round(statistics.median(ratios), 2)
        out[name] = row
    return out


def _minute(stamp: str) -> str:
    """pytest-benchmark's ISO ``datetime`` as ``YYYY-MM-DDTHH:MMZ`` (UTC)."""
    when = datetime.datetime.fromisoformat(stamp)
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%MZ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files, one per run")
    parser.add_argument("--out", type=Path, required=True, help="the summary JSON to write")
    parser.add_argument("--command", required=True, help="the command that made the runs (recorded as is)")
    parser.add_argument("--note", action="append", default=[], help="a note to record (repeatable)")
    args = parser.parse_args(argv)
    try:
        runs = [json.loads(p.read_text(encoding="utf-8")) for p in args.runs]
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read a run: {exc}")
    machines = {json.dumps(r.get("machine_info", {}).get("node")) for r in runs}
    if len(machines) > 1:
        parser.error(f"the runs come from different machines: {', '.join(sorted(machines))}")
    machine = runs[0].get("machine_info", {})
    dates = sorted(r["datetime"] for r in runs if "datetime" in r)
    import torch

    summary = {
        "date": _minute(dates[-1]) if dates else None,  # when the last run was made
        "first_run": _minute(dates[0]) if dates else None,
        "command": args.command,
        "machine": {
            "cpu": machine.get("cpu", {}).get("brand_raw"),
            "cores": machine.get("cpu", {}).get("count"),
            "transport": "gloo over loopback TCP, 2 processes on the same host",
        },
        # torch is not in pytest-benchmark's machine_info: this is the summarizing environment's, the
        # one that made the runs when summarize.py runs in the same virtual environment.
        "versions": {"python": machine.get("python_version"), "torch": torch.__version__},
        "runs": [str(p) for p in args.runs],
        "rows": summarize(runs),
        "notes": args.note,
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(summary['rows'])} rows from {len(runs)} runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
