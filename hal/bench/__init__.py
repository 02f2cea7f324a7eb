"""The benchmark suite: every compute op of a backend at named shapes, against baselines and the hardware.

``hal bench`` (:mod:`hal.cli`) and the pytest-benchmark files under ``bench/`` use this package:

- :mod:`hal.bench.shapes`: the shape sets (``deepseek-v3``: the published anchors' shapes;
  ``cpu-small``: sized for a 2-core CPU, the default on a CPU).
- :mod:`hal.bench.cases`: seeded inputs on the device, the op and its baselines bound to them.
- :mod:`hal.bench.metrics`: FLOPs and bytes by the anchors' formulas; TFLOPS, GB/s, % of peak.
- :mod:`hal.bench.peaks`: accelerators' peaks table; the CPU's bandwidth and GEMM rate measured at start.
- :mod:`hal.bench.timing`: warm-up and medians; device events with an L2 flush and CUDA graphs on CUDA.
- :mod:`hal.bench.runner`: runs a suite into a :class:`~hal.bench.runner.Run` (the JSON document).
- :mod:`hal.bench.report`: the table, the JSON file, the roofline PNG, and comparing two runs.

Typical use::

    import hal
    from hal.bench import run_suite, shape_set
    be = hal.get_backend("cpu")
    run = run_suite(be, hal.default_registry().reference_ops(), shape_set("cpu-small"), quick=True)
    doc = run.as_dict()
"""

from __future__ import annotations

from hal.bench.cases import BASELINES, BENCH_OPS, COLLECTIVE_OPS, BenchCase, cases_for, prepare
from hal.bench.report import compare, format_comparison, format_table, load_results, plot_roofline, write_json
from hal.bench.runner import SCHEMA, Run, run_suite
from hal.bench.shapes import SHAPE_SETS, Shape, ShapeSet, default_shape_set, shape_set

__all__ = [
    "BASELINES",
    "BENCH_OPS",
    "COLLECTIVE_OPS",
    "SCHEMA",
    "SHAPE_SETS",
    "BenchCase",
    "Run",
    "Shape",
    "ShapeSet",
    "cases_for",
    "compare",
    "default_shape_set",
    "format_comparison",
    "format_table",
    "load_results",
    "plot_roofline",
    "prepare",
    "run_suite",
    "shape_set",
    "write_json",
]
