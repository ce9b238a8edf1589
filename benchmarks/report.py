"""Shared output for benchmarks: a plain-text table printed last, and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (they mean nothing without it)."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "omp_num_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Align ``rows`` (dicts) as a Markdown table; floats get 4 significant digits, lists are
    left out of the table (they stay in the JSON)."""
    if not rows:
        return "(no rows)"
    # Rows of different kinds (e.g. a breakdown row) may add columns: show the union, in order.
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None or isinstance(v, (list, dict)) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def write_report(path: str | Path, name: str, rows: list[dict[str, Any]], **meta: Any) -> None:
    """Write ``{"benchmark", "machine", "meta", "rows"}`` as JSON and print the table last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), "meta": meta, "rows": rows}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\n{name} ({payload['machine'].get('gpu') or str(os.cpu_count()) + ' CPU cores'}); JSON: {path}")
    print(format_table(rows))
