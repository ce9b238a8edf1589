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


def cpu_model() -> str:
    """lscpu's model name plus the vector extensions timings depend on (matmul, bf16, faiss)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(ext) or 'no AVX2'})"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (they mean nothing without it)."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": cpu_model(),
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


class Report:
    """A benchmark's JSON, rewritten (atomically) after every row, so that a stage killed by
    its time box or failing halfway keeps the rows it finished; :meth:`finish` prints the table.

    ``status`` in the JSON is ``running`` until :meth:`finish` (``complete``) or
    :meth:`fail` (``failed`` with the error line).
    """

    def __init__(self, path: str | Path, name: str, **meta: Any) -> None:
        self.path, self.name, self.meta = Path(path), name, dict(meta)
        self.rows: list[dict[str, Any]] = []
        self.machine = machine_info()
        self.status, self.error = "running", None
        self.save()

    def add(self, row: dict[str, Any], echo: bool = True) -> None:
        """Append one finished row and write the file."""
        self.rows.append(row)
        if echo:
            print(json.dumps(row, default=str), flush=True)
        self.save()

    def finish(self, **meta: Any) -> None:
        """Mark the benchmark complete (adding ``meta``) and print the table."""
        self.meta.update(meta)
        self.status = "complete"
        self.save()
        where = self.machine.get("gpu") or f"{os.cpu_count()} CPU cores"
        print(f"\n{self.name} ({where}); JSON: {self.path}")
        print(format_table(self.rows))

    def fail(self, error: BaseException | str) -> None:
        """Record why the benchmark stopped before finishing (rows so far are kept)."""
        self.status, self.error = "failed", str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        self.save()

    def save(self) -> None:
        """Write the JSON now (atomically), e.g. after changing :attr:`meta`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": self.name, "status": self.status, "error": self.error, "machine": self.machine,
                   "meta": self.meta, "rows": self.rows}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, self.path)


def write_report(path: str | Path, name: str, rows: list[dict[str, Any]], **meta: Any) -> None:
    """Write ``{"benchmark", "status", "machine", "meta", "rows"}`` as JSON and print the table last."""
    report = Report(path, name, **meta)
    for row in rows:
        report.add(row, echo=False)
    report.finish()
