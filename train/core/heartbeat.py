"""Heartbeats between ranks: a stopped or lost peer ends the job within a bound.

A rank that dies closes its sockets, and the others' collectives fail by themselves. A rank
that is *stopped* (SIGSTOP, a hung GPU, a swapping host, a stuck file system) keeps its
sockets open, and every other rank waits in its next collective until the process group's
timeout (30 minutes, or for ever under some backends). A collective timeout short enough to
help would also kill healthy jobs whose step is merely slow (a long checkpoint write, an
evaluation), so each rank runs a thread instead that beats (increments a counter of its own
in the job's rendezvous store) and watches everyone's counters. The thread keeps beating
while its rank's main thread is busy, so a slow step looks healthy; only a process that
does not run at all stops beating. A peer whose counter has not moved for ``timeout_s``
seconds (as this rank's monotonic clock counts: no clock agreement between hosts is needed)
is reported in one line and this rank exits, since its main thread may be blocked in a
collective that nothing can interrupt.

The counters live under a key prefix drawn once per job start, so a restarted job (torchrun
``--max-restarts``, a SLURM requeue) does not read the previous attempt's beats.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterator

from train.core.collectives import Comm
from train.core.errors import say

EXIT_CODE = 1
"""How a rank that gives up on its peers exits (a peer failure, as in :class:`PeerError`)."""
_DONE = -(10**15)
"""Added to a rank's counter when it leaves normally: a negative counter is not stalled."""


def beat_interval(timeout_s: float) -> float:
    """Seconds between beats: a tenth of the bound (so a report comes at most that late), at most 5 s."""
    return min(5.0, timeout_s / 10)


class Heartbeat:
    """This rank's beating and watching thread (see the module docstring).

    Args:
        store: a ``torch.distributed`` store shared by the job's ranks (keys under a prefix of
            this job start; see :func:`heartbeat`).
        rank: this rank.
        world: number of ranks.
        timeout_s: seconds without a beat after which a peer is stalled or lost.
        on_lost: called (from the thread) with the one-line report; the default logs it and
            ends the process with :data:`EXIT_CODE`.
        clock: a monotonic clock (tests pass their own).
    """

    def __init__(self, store: Any, rank: int, world: int, timeout_s: float,
                 on_lost: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.interval = beat_interval(timeout_s)
        self.on_lost = on_lost or _exit_with
        self.clock = clock
        self.where = "starting"
        """What this rank is doing (set by the trainer), for the report."""
        self._keys = [f"beat/{r}" for r in range(world)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-rank{rank}", daemon=True)
        self._seen: list[bytes | None] = [None] * world
        self._since = [0.0] * world

    def start(self) -> "Heartbeat":
        """Beat once and start the thread."""
        self.store.add(self._keys[self.rank], 1)
        now = self.clock()
        self._since = [now] * self.world  # a peer that never beats is stalled since our start
        self._thread.start()
        return self

    def stop(self) -> None:
        """Leave: stop the thread and tell the peers this rank ended on purpose (best effort)."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1)
        with contextlib.suppress(Exception):  # the store's host may have left already
            self.store.add(self._keys[self.rank], _DONE)

    def check(self) -> list[tuple[int, float]]:
        """One round: beat, read every counter; returns ``(rank, seconds silent)`` of stalled peers."""
        self.store.add(self._keys[self.rank], 1)
        if any(v is None for v in self._seen) and not self.store.check(self._keys):
            values: list[bytes | None] = [self.store.get(k) if self.store.check([k]) else None for k in self._keys]
        else:
            values = list(self.store.multi_get(self._keys))
        now = self.clock()
        stalled = []
        for r, value in enumerate(values):
            if value is not None and value != self._seen[r]:
                self._seen[r], self._since[r] = value, now
            if r == self.rank or (value is not None and int(value) < 0):
                continue
            if now - self._since[r] > self.timeout_s:
                stalled.append((r, now - self._since[r]))
        return stalled

    def _loop(self) -> None:
        ok_at = self.clock()
        while not self._stop.wait(self.interval):
            try:
                stalled = self.check()
                ok_at = self.clock()
            except Exception as e:  # a stopped store host times out; a dead one refuses
                silent = self.clock() - ok_at
                if silent > self.timeout_s and not self._stop.is_set():
                    self.on_lost(f"rank {self.rank}: the rendezvous store has not answered for {silent:.1f} s "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) while {self.where}; "
                                 f"its host is stalled or lost (train.peer_timeout_s={self.timeout_s:g}): stopping")
                    return
                continue
            if stalled and not self._stop.is_set():
                who = ", ".join(f"rank {r} silent for {s:.1f} s" for r, s in stalled)
                self.on_lost(f"rank {self.rank}: peer ranks stalled or lost: {who}; this rank was {self.where} "
                             f"(train.peer_timeout_s={self.timeout_s:g}): stopping")
                return


_on_lost: Callable[[str], None] | None = None


def on_peer_lost(hook: Callable[[str], None] | None) -> None:
    """Run ``hook(report)`` (from the heartbeat thread) before a rank that lost its peers exits:
    a launcher's chance to requeue the job. None removes it."""
    global _on_lost
    _on_lost = hook


def _exit_with(line: str) -> None:
    """Report and end the process: the main thread may be blocked in a collective for good."""
    say(line)  # not through logging: a rank's handlers may drop or reformat it
    if _on_lost is not None:
        try:
            _on_lost(line)
        except SystemExit:  # a requeue handler ends its work by exiting (here: the thread)
            pass
        except BaseException as e:  # noqa: BLE001 (a failing hook must not stop the exit)
            say(f"heartbeat: on-lost hook failed: {type(e).__name__}: {e}")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(EXIT_CODE)


def job_store(timeout_s: float) -> Any:
    """A client of the process group's own store with a timeout of its own.

    The default group's store is where the job met (torchrun's agent or rank 0 serve it, at
    whatever address the launcher chose), so every rank reaches it; a second connection keeps
    our short timeout off the group's own operations, and lets a stopped store host time out.
    A store that is no TCPStore (a test's in-memory one) is used as it is.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return dist.TCPStore(store.host, store.port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=timeout_s))
    return store


@contextlib.contextmanager
def heartbeat(comm: Comm, timeout_s: float) -> Iterator[Heartbeat | None]:
    """Beat and watch the peers for the block (None, doing nothing, alone or with ``timeout_s`` 0)."""
    if comm.world == 1 or timeout_s <= 0:
        yield None
        return
    import torch.distributed as dist

    prefix = comm.all_gather_object(secrets.token_hex(8))[0]  # one prefix per job start, rank 0's
    store = job_store(max(1.0, 2 * beat_interval(timeout_s)))
    beat = Heartbeat(dist.PrefixStore(f"orbitclip/heartbeat/{prefix}/", store), comm.rank, comm.world, timeout_s)
    beat.start()
    try:
        yield beat
    finally:
        beat.stop()
