"""Build options shared by the CLI, the Python API, the sources and the builder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEFAULT_TEMPLATES = ["a satellite photo of {}."]


@dataclass
class BuildOptions:
    """Every ``shards build`` option (CLI flag ``--x-y`` is field ``x_y``).

    ``val_fraction``/``test_fraction`` of None mean 0, except for the synthetic
    source, whose default is 0.1 each so that ``make demo`` gets val and test.
    """

    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    class_map: str | None = None
    dataset: str = "auto"
    split_file: str | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    images: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    separator: str = ","
    split_column: str | None = None
    label_column: str | None = None
    count: int = 1000
    seed: int = 0
    image_size: int = 64
    shard_size: int = 1000
    shard_bytes: int = 512 * 1024 * 1024
    resize: int | None = None
    jpeg_quality: int = 95
    workers: int = 1
    dedup: bool = True
    drop_leaks: bool = False
    overwrite: bool = False
    progress: bool = True

    def fractions(self, source: str) -> tuple[float, float]:
        """Effective ``(val_fraction, test_fraction)`` for ``source``."""
        default = 0.1 if source == "synthetic" else 0.0
        val = default if self.val_fraction is None else self.val_fraction
        test = default if self.test_fraction is None else self.test_fraction
        return float(val), float(test)

    def validate(self) -> None:
        """Raise ``ValueError`` for an option value that cannot work."""
        if not self.templates:
            raise ValueError("at least one caption template is needed")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")
        for name in ("shard_size", "shard_bytes", "workers", "count", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"resize must be >= 1, got {self.resize}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if len(self.separator) != 1:
            raise ValueError(f"separator must be one character, got {self.separator!r}")

    def recorded(self) -> dict:
        """Options that shape the output (stored in the manifest; run-only ones left out)."""
        d = dataclasses.asdict(self)
        for k in ("workers", "overwrite", "progress"):
            d.pop(k)
        return d


def make_options(options: dict) -> BuildOptions:
    """``BuildOptions`` from keyword options, naming any unknown ones."""
    known = {f.name for f in dataclasses.fields(BuildOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown build option(s) {unknown}; known: {sorted(known)}")
    opts = BuildOptions(**options)
    if isinstance(opts.templates, str):
        opts.templates = [opts.templates]
    opts.validate()
    return opts
