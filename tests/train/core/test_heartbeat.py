"""Heartbeats in one process: peers as Heartbeat objects on one in-memory store, a clock of our own.

The two-node rehearsal (a SIGSTOPped node, then SIGCONT) is in tests/launch/test_multinode.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from train.core.heartbeat import Heartbeat, beat_interval


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_silent_peer_is_reported_after_the_bound_and_a_beating_or_finished_one_is_not():
    store, clock = dist.HashStore(), Clock()
    beats = [Heartbeat(store, r, 4, timeout_s=10, clock=clock) for r in range(4)]
    for b in beats[:3]:
        b.store.add(b._keys[b.rank], 1)  # ranks 0-2 beat once; rank 3 never starts
    watcher = beats[0]
    watcher._since = [clock.now] * 4
    assert watcher.check() == []
    store.add(beats[2]._keys[2], -(10**15))  # rank 2 left on purpose (Heartbeat.stop)
    for _ in range(3):
        clock.now += 4
        beats[1].store.add(beats[1]._keys[1], 1)  # rank 1 keeps beating: a slow step, not a stall
        stalled = watcher.check()
    assert [r for r, _ in stalled] == [3] and stalled[0][1] == pytest.approx(12)
    store.add(beats[3]._keys[3], 1)  # rank 3 shows up: healthy again
    assert watcher.check() == []


def test_the_thread_reports_a_stopped_peer_within_the_bound_and_keeps_quiet_while_it_beats():
    store = dist.HashStore()
    reports: list[tuple[float, str]] = []
    got = threading.Event()

    def on_lost(line: str) -> None:
        reports.append((time.monotonic(), line))
        got.set()

    a = Heartbeat(store, 0, 2, timeout_s=1.0, on_lost=on_lost)
    b = Heartbeat(store, 1, 2, timeout_s=1.0, on_lost=on_lost)
    a.where = "in step 7"
    a.start(), b.start()
    time.sleep(1.5)  # both beat: nothing to report
    assert reports == []
    b._stop.set()  # rank 1 stops beating without saying goodbye (as under SIGSTOP)
    b._thread.join()
    stopped = time.monotonic()
    assert got.wait(5), "the silent peer was never reported"
    a.stop()
    assert len(reports) == 1
    at, line = reports[0]
    assert at - stopped <= 1.0 + 2 * beat_interval(1.0) + 0.5
    assert line.startswith("rank 0: peer ranks stalled or lost: rank 1 silent for 1.")
    assert "this rank was in step 7 (train.peer_timeout_s=1): stopping" in line
    assert "\n" not in line


class DeadStore:
    """A store whose host stopped answering."""

    def add(self, key: str, n: int) -> int:
        raise TimeoutError("Socket Timeout\nmore")


def test_a_store_that_stops_answering_is_reported():
    reports: list[str] = []
    beat = Heartbeat(DeadStore(), 1, 2, timeout_s=0.5, on_lost=reports.append)
    beat._thread.start()  # start() would beat once on the dead store
    beat._thread.join(5)
    assert len(reports) == 1
    assert reports[0].startswith("rank 1: the rendezvous store has not answered for 0.")
    assert "(TimeoutError: Socket Timeout) while starting; its host is stalled or lost" in reports[0]


def test_bound_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Heartbeat(dist.HashStore(), 0, 2, timeout_s=0)


def test_a_negative_bound_is_a_config_error(tmp_path):
    from tests.train.test_trainer import micro_cfg
    from train.core.configbase import ConfigError
    from train.trainer import run

    with pytest.raises(ConfigError, match=r"train.peer_timeout_s must be >= 0 \(0 = no heartbeat\), got -1"):
        run(micro_cfg(tmp_path / "run", "train.steps=1", "train.peer_timeout_s=-1"))


def test_a_busy_main_thread_keeps_beating():
    """A slow step (here pure Python holding the GIL between switches) is not a stall."""
    store, reports = dist.HashStore(), []
    beats = [Heartbeat(store, r, 2, timeout_s=0.5, on_lost=reports.append).start() for r in range(2)]
    end = time.monotonic() + 1.5
    n = 0
    while time.monotonic() < end:
        n += 1
    for b in beats:
        b.stop()
    assert reports == []
    assert all(int(store.get(f"beat/{r}")) < 0 for r in range(2))  # both left on purpose
