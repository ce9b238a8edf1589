"""Evaluator plug-ins, registered by name (big_vision style).

An evaluator is a function ``fn(ctx: EvalContext, opts: Options) -> Iterator[(name, value)]``
plus a dataclass ``Options`` validated from the benchmark YAML (unknown keys rejected).
"""

from __future__ import annotations

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
    import eval.evaluators  # noqa: F401  (registers the built-in evaluators)

    if name not in _REGISTRY:
        raise ConfigError(f"unknown evaluator {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def parse_options(name: str, options: dict[str, Any] | None) -> Any:
    """Validate an evaluator's options from YAML into its dataclass."""
    return from_dict(get(name).options, dict(options or {}), where=f"evaluators.{name}")


def names() -> list[str]:
    """All registered evaluator names."""
    import eval.evaluators  # noqa: F401

    return sorted(_REGISTRY)
