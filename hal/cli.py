"""The ``hal`` command line.

``hal info`` shows what HAL discovered: plugins (distribution, version, status), backends
(availability and reason, priority), the selected backend, and for every available backend its device,
capabilities and op table (op → implementation → why). ``--json`` prints the same as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

import hal
from hal.errors import HALError
from hal.registry import Registry

__all__ = ["info_data", "main"]


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def info_data(registry: Registry, backend: str | None = None) -> dict[str, Any]:
    """Everything ``hal info`` shows, as plain data (what ``--json`` prints).

    :param backend: show only this backend's table (``None``: every available backend).
    """
    try:
        selected: str | None = registry.select(backend)
        selection_error = None
    except HALError as exc:
        selected, selection_error = None, str(exc)
    backends = []
    for info in registry.backends():
        item: dict[str, Any] = {
            "name": info.name,
            "priority": info.priority,
            "plugin": info.plugin,
            "description": info.description,
            "reference": info.reference,
            "available": info.available,
            "reason": info.reason,
            "details": {k: _jsonable(v) for k, v in info.details.items()},
            "selected": info.name == selected,
        }
        if info.available and (backend is None or info.name == backend):
            try:
                be = registry.get_backend(info.name)
            except HALError as exc:
                item["error"] = str(exc)
            else:
                item["device"] = str(be.device)
                item["validate"] = be.validate
                item["capabilities"] = be.capabilities.as_dict()
                item["ops"] = {op: entry.as_dict() for op, entry in be.table.items()}
        backends.append(item)
    return {
        "hal_version": hal.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "plugins": [p.as_dict() for p in registry.plugins()],
        "backends": backends,
        "selected": selected,
        "selection_error": selection_error,
        "catalogue": list(hal.OPS),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def format_info(data: dict[str, Any]) -> str:
    """The human form of :func:`info_data`."""
    out = [f"HAL {data['hal_version']} · torch {data['torch_version']} · Python {data['python_version']}", ""]
    out.append("Plugins (entry-point group 'hal')")
    rows = [["NAME", "DISTRIBUTION", "VERSION", "STATUS", "PROVIDES / ERROR"]]
    for p in data["plugins"]:
        provides = ", ".join([f"backend {b}" for b in p["backends"]] + [f"op {o}" for o in p["ops"]])
        rows.append(
            [
                p["name"],
                p["distribution"] or "-",
                p["version"] or "-",
                p["status"],
                p["error"] if p["status"] == "failed" else (provides or "-"),
            ]
        )
    out += [_table(rows), ""]
    out.append("Backends")
    rows = [["NAME", "PRIORITY", "AVAILABLE", "REASON"]]
    for b in data["backends"]:
        mark = "*" if b["selected"] else " "
        rows.append([f"{mark}{b['name']}", str(b["priority"]), "yes" if b["available"] else "no", b["reason"] or "-"])
    out += [_table(rows), ""]
    if data["selected"]:
        out.append(f"Selected: {data['selected']}  (HAL_BACKEND or --backend picks another; * above)")
    else:
        out.append(f"Selected: none\n{data['selection_error']}")
    for b in data["backends"]:
        if "error" in b:
            out += ["", f"Backend {b['name']}: failed to build: {b['error']}"]
        if "ops" not in b:
            continue
        caps = b["capabilities"]
        out += ["", f"Backend {b['name']} on {b['device']}: {caps['device_name']}"]
        out.append(
            f"  arch {caps['arch']} · dtypes {', '.join(caps['dtypes'])} · fp8 {caps['fp8_format'] or 'none'} · "
            f"int8 {'yes' if caps['int8'] else 'no'} · memory {_gib(caps['memory_bytes'])} · "
            f"devices {caps['device_count']} · collectives {caps['dist_backend']} · "
            f"input validation {'on' if b['validate'] else 'off (HAL_VALIDATE=0)'}"
        )
        rows = [["OP", "IMPLEMENTATION", "SOURCE", "WHY"]]
        for op, entry in b["ops"].items():
            rows.append([op, entry["impl"], entry["source"], entry["reason"]])
        out.append(_table(rows))
    return "\n".join(out)


def _cmd_info(args: argparse.Namespace) -> int:
    registry = hal.default_registry()
    if args.backend is not None:
        registry.select(args.backend)  # an unknown or unavailable name is an error, with every reason
    data = info_data(registry, args.backend)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hal",
        description="HAL: one DeepSeek-style MoE+MLA model on any accelerator vendor.",
        epilog="Environment: HAL_BACKEND picks a backend by name; HAL_DISABLE_PLUGINS=a,b blocks plugins; "
        "HAL_VALIDATE=0 turns off op input validation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log plugin discovery and fallbacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser(
        "info",
        help="show plugins, backends, the selected backend and each backend's op table",
        description="Show discovered plugins and backends (available or not, with the reason), the selected "
        "backend, and for every available backend its device, capabilities and op table: which "
        "implementation serves each op, and why (native, plugin override, or fallback to the reference).",
    )
    info.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    info.add_argument("--backend", metavar="NAME", help="show only this backend (an error if it is unavailable)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except HALError as exc:
        print(f"hal {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
