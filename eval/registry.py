"""Evaluator plug-ins, registered by name (big_vision style).

An evaluator is a function ``fn(ctx: EvalContext, opts: Options) -> Iterator[(name, value)]``
plus a dataclass ``Options`` validated from the benchmark YAML (unknown keys rejected).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from train.api import ConfigError, from_dict

Metric = tuple[str, float]


@dataclass(frozen=True)
class Evaluator:
    """A registered evaluator: its name, options schema and run function."""

    name: str
    options: type
    fn: Callable[..., Iterator[Metric]]
    needs_labels: bool = False
    needs_captions: bool = False


_REGISTRY: dict[str, Evaluator] = {}
# Built-in plug-ins, imported by name on first use (they import this module to register:
# naming them here instead of importing them keeps the import graph one-way).
_BUILTIN_MODULES = ("eval.evaluators.zeroshot", "eval.evaluators.retrieval", "eval.evaluators.linear_probe",
                    "eval.evaluators.mlp_probe")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def register(name: str, options: type, *, needs_labels: bool = False,
             needs_captions: bool = False) -> Callable:
    """Decorator: register ``fn`` as evaluator ``name`` with options dataclass ``options``."""
    def wrap(fn: Callable[..., Iterator[Metric]]) -> Callable[..., Iterator[Metric]]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"evaluator {name!r} registered twice")
        _REGISTRY[name] = Evaluator(name, options, fn, needs_labels, needs_captions)
        return fn
    return wrap


def get(name: str) -> Evaluator:
    """The evaluator called ``name``; a clear error lists the known ones."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown evaluator {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def parse_options(name: str, options: dict[str, Any] | None) -> Any:
    """Validate an evaluator's options from YAML into its dataclass."""
    return from_dict(get(name).options, dict(options or {}), where=f"evaluators.{name}")


def names() -> list[str]:
    """All registered evaluator names."""
    _load_builtins()
    return sorted(_REGISTRY)
