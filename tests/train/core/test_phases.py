"""Step phases: the engines mark their own phases, which is what the benchmark breakdown times."""

from __future__ import annotations

import pytest
import torch

from tests.train.engines.equiv_workers import make_batch, make_model
from tests.train.engines.test_no_host_sync import _engine
from train.core import phases


def recorded_step(accum: int) -> list[tuple[str, bool]]:
    model = make_model()
    engine = _engine(model, accum)
    seen: list[tuple[str, bool]] = []
    with phases.listening(lambda name, starting: seen.append((name, starting))):
        engine.step(make_batch(0, 0, 1, model))
    return seen


@pytest.mark.parametrize("accum", [1, 2])
def test_a_ddp_step_marks_each_phase_once_in_order(accum):
    seen = recorded_step(accum)
    assert [n for n, starting in seen if starting] == list(phases.PHASES)
    # Every phase closes before the next opens (no nesting, nothing left open).
    assert seen == [(n, s) for n in phases.PHASES for s in (True, False)]


def test_phases_are_profiler_regions():
    model = make_model()
    engine = _engine(model, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.step(make_batch(0, 0, 1, model))
    names = {e.key for e in prof.key_averages()}
    assert {f"orbitclip.{p}" for p in phases.PHASES} <= names


def test_one_listener_at_a_time():
    with phases.listening(lambda *_: None):
        with pytest.raises(RuntimeError, match="already installed"):
            with phases.listening(lambda *_: None):
                pass
    with phases.listening(lambda *_: None):  # released after the block
        pass
