"""Python API used by the CLI and by the eval harness (builds benchmark data on the fly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards import builder
from shards.grid import contact_sheet
from shards.options import make_options
from shards.verify import inspect_shards


def build(source: str, input: str | Path | None, output: str | Path, **options: Any) -> dict[str, Any]:
    """Build shards from ``input`` with ``source`` (folder, karpathy, csv, synthetic).

    Args:
        source: Source kind.
        input: Class folder, caption JSON or CSV (None for synthetic).
        output: Output folder (refused if it holds shards, unless ``overwrite=True``).
        **options: The CLI options as keywords (see :class:`shards.options.BuildOptions`).

    Returns:
        The manifest (also written to ``output/manifest.json``).

    Raises:
        ValueError: for bad options or an unusable input; TypeError for unknown options;
            FileExistsError for an occupied output folder.
    """
    opts = make_options(options)
    return builder.build(source, None if input is None else str(input), output, opts)


def inspect(output: str | Path, grid: str | Path | None = None, examples: int = 3,
            grid_count: int = 24) -> dict[str, Any]:
    """Verify and summarise built shards; optionally write a contact sheet PNG to ``grid``.

    Returns:
        The report from :func:`shards.verify.inspect_shards` (without image bytes),
        plus ``"grid"`` (path or None).
    """
    report = inspect_shards(output, examples=examples, keep_images=grid_count if grid else 0)
    images = report.pop("images")
    report["grid"] = str(contact_sheet(images, grid)) if grid and images else None
    return report
