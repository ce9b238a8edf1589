"""Benchmark definitions: the YAML schema of ``configs/benchmarks/*.yaml`` and lookup.

A benchmark says where its images come from (``data``), what the classes are
called in prompts (``classes``), which prompt ``templates`` to ensemble and which
``evaluators`` run with which options. Unknown keys anywhere are errors.

Benchmarks ship in the ``configs`` package (``configs.ROOT / "benchmarks"``), so they are
found the same way in a checkout and in an installed orbitclip. Relative data paths resolve
against ``$ORBITCLIP_DATA`` (default: ``../shared/data`` beside the checkout, or beside the
current directory when orbitclip is installed) or, with ``data.root: repo``, against the
checkout (installed: the current directory); see :func:`configs.project_root`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import configs
from train.api import ConfigError, from_dict, read_yaml

BENCHMARK_DIR = configs.ROOT / "benchmarks"


def data_root() -> Path:
    """Where relative benchmark data paths point: ``$ORBITCLIP_DATA``, else ``../shared/data``
    relative to :func:`configs.project_root` (the checkout, or the current directory)."""
    env = os.environ.get("ORBITCLIP_DATA")
    return Path(env).expanduser().resolve() if env else (configs.project_root().parent / "shared" / "data").resolve()


@dataclass
class DataSpec:
    """Where a benchmark's samples come from."""

    kind: Literal["shards", "folder", "karpathy", "csv", "synthetic"] = "shards"
    """``shards``: a ``python -m shards build`` output; ``folder``/``karpathy``/``csv``:
    raw data built into shards on the fly (cached); ``synthetic``: shards.synthetic scenes."""
    path: str = ""
    """Shards output folder, class-folder root, Karpathy JSON or CSV file."""
    root: Literal["data", "repo"] = "data"
    """Base of a relative ``path``/``images``: the data root, or the repository (the checkout;
    the current directory when orbitclip is installed)."""
    images: str | None = None
    """Image folder for karpathy/csv sources (shards.api.build's ``images``)."""
    split: str = "test"
    """Which split is evaluated."""
    build: dict[str, Any] = field(default_factory=dict)
    """Extra options for shards.api.build (e.g. ``val_fraction: 0.1``); part of the cache key."""
    max_samples: int | None = None
    """Evaluate an evenly spaced subset of at most this many samples (quick checks)."""
    filter: Literal["none", "filename_names_class"] = "none"
    """``filename_names_class``: only samples whose file name starts with a class key count
    as labelled (CLIP-rsicd's RSICD-30 protocol); the rest stay for retrieval only."""
    count: int = 500
    """synthetic: number of scenes."""
    seed: int = 1009
    """synthetic: render seed; keep it different from any training seed (held out)."""
    image_size: int = 64
    """synthetic: scene size in pixels."""

    def validate(self) -> None:
        if self.kind != "synthetic" and not self.path:
            raise ConfigError(f"data.path is required for kind={self.kind}")
        if self.kind in ("karpathy", "csv") and not self.images:
            raise ConfigError(f"data.images (the image folder) is required for kind={self.kind}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError("data.max_samples must be >= 1")
        if self.kind == "synthetic" and self.count < 1:
            raise ConfigError("data.count must be >= 1")

    def resolve(self, p: str) -> Path:
        """Absolute path for a data path of this spec."""
        path = Path(os.path.expandvars(p)).expanduser()
        if path.is_absolute():
            return path
        return (configs.project_root() if self.root == "repo" else data_root()) / path


@dataclass
class BenchmarkSpec:
    """One benchmark (``configs/benchmarks/NAME.yaml``)."""

    name: str
    data: DataSpec
    evaluators: dict[str, dict[str, Any]]
    """Evaluator name -> its options (see ``python -m eval list``)."""
    description: str = ""
    classes: dict[str, str] | list[str] | None = None
    """Prompt class names. A list: index = the dataset's integer label (or matched by name).
    A mapping: dataset class name -> prompt name (order = label order); samples whose class
    is not listed are not used for classification. None: the dataset's own names."""
    templates: list[str] | None = None
    """Prompt templates with one ``{}``; None: the dataset's own (shards manifest/synthetic)."""
    sources: str = ""
    """Provenance of class names and templates (shown by ``python -m eval list``)."""
    table: list[str] = field(default_factory=list)
    """Metrics shown in the Markdown table (default: acc1/acc5 or mean_recall)."""

    def validate(self) -> None:
        from eval import registry
        from eval.prompts import fill_template

        if not self.evaluators:
            raise ConfigError(f"benchmark {self.name}: no evaluators")
        for ev_name, opts in self.evaluators.items():
            registry.parse_options(ev_name, opts)
        for t in self.templates or []:
            try:
                fill_template(t, "x")
            except ValueError as e:
                raise ConfigError(f"benchmark {self.name}: {e}") from None
        if isinstance(self.classes, list) and len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"benchmark {self.name}: duplicate class names")
        if self.data.filter == "filename_names_class" and not isinstance(self.classes, dict):
            raise ConfigError(f"benchmark {self.name}: filter filename_names_class needs a classes mapping")

    @property
    def classnames(self) -> list[str] | None:
        """Prompt names in label order, if the benchmark defines them."""
        if isinstance(self.classes, dict):
            return list(self.classes.values())
        return list(self.classes) if self.classes is not None else None


def available() -> list[str]:
    """Names of the shipped benchmarks."""
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml"))


def benchmark_path(name_or_file: str) -> Path:
    """The YAML file for a benchmark name or path; a clear error when unknown."""
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"benchmark file not found: {p}")
        return p
    p = BENCHMARK_DIR / f"{name_or_file}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown benchmark {name_or_file!r}; shipped: {', '.join(available())}")
    return p


def load_benchmark(name_or_file: str, overrides: dict[str, Any] | None = None) -> BenchmarkSpec:
    """Load and validate a benchmark by name (configs/benchmarks) or YAML path.

    Args:
        name_or_file: ``eurosat`` or ``path/to/bench.yaml``.
        overrides: top-level keys merged into ``data`` (e.g. ``{"max_samples": 50}``).
    """
    path = benchmark_path(name_or_file)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    if overrides:
        raw["data"] = {**(raw.get("data") or {}), **overrides}
    try:
        return from_dict(BenchmarkSpec, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
