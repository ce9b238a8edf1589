"""Heartbeats in one process: peers as Heartbeat objects on one in-memory store, a clock of our own.

The two-node rehearsal (a SIGSTOPped node, then SIGCONT) is in tests/launch/test_multinode.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from train.core.collectives import is_peer_loss
from train.core.errors import PeerError, PeerLostError
from train.core.heartbeat import EXIT_CODE, Heartbeat, beat_interval


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


def test_a_rank_that_lost_its_peers_runs_the_hooks_then_exits_with_the_peer_code(tmp_path):
    """The launcher's hook (a requeue) runs before the exit, even when it ends by SystemExit."""
    import subprocess
    import sys

    from tests import REPO_ROOT

    out = tmp_path / "hook.txt"
    code = (f"from train.core import heartbeat as h\n"
            f"def hook(line):\n    open({str(out)!r}, 'w').write(line)\n    raise SystemExit(-1)\n"
            f"h.on_peer_lost(hook)\nh._exit_with('rank 0: peer ranks stalled or lost')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CODE, proc.stderr
    assert out.read_text() == "rank 0: peer ranks stalled or lost"
    assert "hook failed" not in proc.stderr and "peer ranks stalled or lost" in proc.stderr


@pytest.mark.parametrize("error, lost", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4992."), True),
    (RuntimeError("Connection reset by peer"), True),
    (dist.DistError("store timed out"), True),
    (PeerLostError("rank 1: a peer rank was lost"), True),
    (PeerError("rank 1 failed: ValueError: bad shard"), False),
    (RuntimeError("CUDA out of memory"), False),
    (ValueError("Connection closed by peer"), False),
])
def test_peer_loss_is_told_from_a_peer_error_and_from_a_bug(error, lost):
    assert is_peer_loss(error) is lost



def test_a_report_reaches_stderr_as_one_write(monkeypatch):
    """The ranks of a node share stderr: a heartbeat report written in two parts (print) ran into
    another rank's in CI."""
    import io
    import os
    import sys

    from train.core import errors

    class Stderr(io.StringIO):  # a stream with a descriptor: the parts it is handed are counted
        parts: list[str] = []

        def write(self, s: str) -> int:
            self.parts.append(s)
            return len(s)

        def fileno(self) -> int:
            return 2

    calls: list[tuple[int, bytes]] = []
    monkeypatch.setattr(sys, "stderr", Stderr())
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append((fd, bytes(data))) or len(data))
    errors.say("rank 1: peer ranks stalled or lost: rank 2 silent for 6.0 s")
    assert calls == [(2, b"rank 1: peer ranks stalled or lost: rank 2 silent for 6.0 s\n")]
    assert Stderr.parts == []
