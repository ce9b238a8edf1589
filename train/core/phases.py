"""Named phases of a training step, for profilers and benchmarks.

The engines mark their own phases (``with phase("forward"):``), so a step breakdown times
the real :meth:`Engine.step` instead of a copy of it that can drift. Each phase is a
``torch.profiler.record_function`` region (visible in any torch profiler trace) and, when a
listener is installed (:func:`listening`), a pair of calls ``listener(name, True)`` /
``listener(name, False)`` at its edges; the benchmark's listener records CUDA events there,
so nothing synchronizes inside the step. Without a listener a phase costs one profiler
op enter/exit (microseconds).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

Listener = Callable[[str, bool], None]
"""``listener(phase, starting)``: called on entering (True) and leaving (False) a phase."""

PHASES = ("forward", "loss", "backward", "collectives", "optimizer")
"""What the engines mark, in step order (the feature cache repeats forward/backward per micro-batch)."""

_listener: Listener | None = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase of the step (see the module docstring)."""
    listener = _listener
    with torch.profiler.record_function(f"orbitclip.{name}"):
        if listener is not None:
            listener(name, True)
        try:
            yield
        finally:
            if listener is not None:
                listener(name, False)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Install ``listener`` for the phases run inside the block (one at a time, not nested)."""
    global _listener
    if _listener is not None:
        raise RuntimeError("a phase listener is already installed")
    _listener = listener
    try:
        yield
    finally:
        _listener = None
