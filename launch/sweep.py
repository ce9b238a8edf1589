"""Hyper-parameter sweeps: ``key=v1,v2`` axes -> the Cartesian product of override lists."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path


from train.api import Config, ConfigError, load_config


@dataclass(frozen=True)
class SweepPoint:
    """One member of a sweep: its extra overrides and the run-name suffix naming them."""

    overrides: list[str]
    suffix: str


def split_values(text: str) -> list[str]:
    """Split ``1e-4,5e-5`` on top-level commas; ``[0.9,0.98],[0.9,0.95]`` keeps the lists whole."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced brackets in sweep values {text!r}")
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"unbalanced brackets in sweep values {text!r}")
    values.append(text[start:])
    values = [v.strip() for v in values]
    if not all(values):
        raise ConfigError(f"empty value in sweep {text!r}")
    return values


def parse_axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["optim.lr=1e-4,5e-5", ...]`` -> ``[("optim.lr", ["1e-4", "5e-5"]), ...]``."""
    axes: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key or not all(key.split(".")):
            raise ConfigError(f"sweep {spec!r} must look like section.key=v1,v2")
        if key in seen:
            raise ConfigError(f"sweep key {key!r} given twice")
        seen.add(key)
        values = split_values(raw)
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep {spec!r} repeats a value")
        axes.append((key, values))
    return axes


def _slug(text: str) -> str:
    # Run names become folder names: keep them portable.
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_") or "x"


def _labels(keys: list[str]) -> list[str]:
    """Shortest dotted suffix of each key that is unique among the keys (``lr``, ``batch_size``)."""
    out = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if sum(k == label or k.endswith("." + label) for k in keys) == 1:
                break
        out.append(label)
    return out


def expand(specs: list[str]) -> list[SweepPoint]:
    """All combinations of the sweep axes, in order (last axis fastest).

    Axes with a single value are plain overrides and do not appear in the suffix.
    No axes gives one point with no overrides and an empty suffix.
    """
    axes = parse_axes(specs)
    keys = [k for k, _ in axes]
    labels = dict(zip(keys, _labels(keys)))
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        overrides = [f"{k}={v}" for k, v in zip(keys, combo)]
        named = [f"{labels[k]}={v}" for (k, values), v in zip(axes, combo) if len(values) > 1]
        points.append(SweepPoint(overrides, _slug("_".join(named)) if named else ""))
    suffixes = [p.suffix for p in points]
    if len(set(suffixes)) != len(suffixes):
        raise ConfigError(f"sweep values collide once made into run names: {suffixes}")
    return points


@dataclass
class RunSet:
    """The runs one command launches: one, or the members of a sweep."""

    name: str
    """The base run name (before sweep suffixes): job name, and folder of a sweep's array logs."""
    root: Path
    """Absolute run root; run directories are ``root/<run.name>``."""
    configs: list[Config]

    @property
    def is_array(self) -> bool:
        return len(self.configs) > 1


def resolve_runs(config: str | None, overrides: list[str], sweep: list[str]) -> RunSet:
    """One validated config per sweep point, with suffixed run names and an absolute run root.

    Everything is loaded before anything is submitted, so a bad value in any member
    fails the whole command with the key named.
    """
    base = load_config(config, overrides)
    # Jobs may start in another working directory (requeues, array members).
    root = Path(base.run.root).expanduser().resolve()
    cfgs = []
    for point in expand(sweep):
        cfg = load_config(config, [*overrides, *point.overrides])
        if cfg.run.name != base.run.name:
            raise ConfigError("run.name cannot be swept; each member's name is derived from it")
        if point.suffix:
            cfg.run.name = f"{cfg.run.name}-{point.suffix}"
        cfg.run.root = str(Path(cfg.run.root).expanduser().resolve())
        cfgs.append(cfg)
    dirs = [c.run.dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"sweep members share a run directory: {[str(d) for d in dirs]}")
    return RunSet(base.run.name, root, cfgs)
