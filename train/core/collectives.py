"""The one owner of collectives: every ``torch.distributed`` call of orbitclip goes through here.

Why one owner: on a GPU job the *communication* device (where NCCL wants tensors: the
rank's GPU) and the *compute* device are the same, but a tensor made on the host for a
metric or a flag is not, and NCCL rejects it; under gloo it is the other way round for
CUDA tensors. On a CPU test machine both devices are the CPU, so such bugs cannot show.
:class:`Comm` therefore moves every tensor to :attr:`Comm.device` before a collective and
hands results back on the caller's device, and values are read on the host only where a
caller asks for it (:meth:`Comm.read`), once per log step, never inside a step.
``tests/train/core/test_collectives.py`` proves the contract with a fake communication
device, and a static test keeps ``torch.distributed`` collectives out of every other module.

Failure agreement: a rank that raises while the others wait in a collective would leave
them hanging until the NCCL timeout. Inside :meth:`Comm.agreement`, every collective is
preceded by a one-number status exchange, and a rank that fails sends "failed" in the
status exchange the others are waiting in, so every rank raises :class:`PeerError`
promptly with the failing rank's message.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist

from train.core.distenv import DistEnv
from train.core.errors import PeerError, PeerLostError

ReduceOp = Literal["sum", "mean", "max", "min"]
_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host once its values are there: the one device→host copy of orbitclip.

    A non-blocking copy from CUDA returns before the bytes land (in a pinned buffer that a
    ``.tolist()`` or a gloo collective would read stale); this copy blocks until they have.
    A no-op for a tensor already on the host.
    """
    return t.detach().to("cpu", non_blocking=False)


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "remote process exited", "NCCL communicator was aborted")
"""How a lost peer shows in a backend's error text (gloo raises a plain ``RuntimeError``)."""


def is_peer_loss(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank went away (not a bug here)."""
    if isinstance(e, PeerLostError):
        return True
    if isinstance(e, PeerError):  # a peer *raised*: its message says why, it was not lost
        return False
    dist_error = getattr(dist, "DistError", ())
    return isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(p in str(e) for p in _PEER_GONE))


def comm_device_for(backend: str | None, compute: torch.device) -> torch.device:
    """Where tensors must be for ``backend``: the rank's GPU for NCCL, the host otherwise."""
    if backend is not None and backend.lower() == "nccl":
        if compute.type != "cuda":
            raise RuntimeError(f"the NCCL backend needs a CUDA compute device, got {compute}")
        return compute
    return torch.device("cpu")


class Comm:
    """Collectives of this process's job (a no-op world of one without a process group).

    Args:
        env: where this process sits.
        compute: the device the model runs on; the communication device follows from the
            process group's backend (see :func:`comm_device_for`).
    """

    simulated = False
    """True for stand-ins that pretend a world in one process (the memory planner's): :func:`current`
    keeps them installed whatever the process group says."""

    def __init__(self, env: DistEnv, compute: torch.device | str = "cpu") -> None:
        self.env = env
        self.compute = torch.device(compute)
        self.active = env.distributed and dist.is_available() and dist.is_initialized()
        if self.active and dist.get_world_size() != env.world_size:
            raise RuntimeError(f"process group has {dist.get_world_size()} ranks, DistEnv says {env.world_size}")
        backend = dist.get_backend() if self.active else None
        self.device = comm_device_for(backend, self.compute) if self.active else self.compute
        self._agreements: list[str] = []

    @property
    def rank(self) -> int:
        return self.env.rank if self.active else 0

    @property
    def world(self) -> int:
        return self.env.world_size if self.active else 1

    # -- placement (the contract) ----------------------------------------------------------

    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on the communication device (collectives work in place on it)."""
        if self.device.type == "cpu":  # gloo reads the buffer at once: the copy must have landed
            return to_host(t).clone().contiguous()
        return t.detach().to(self.device, copy=True, non_blocking=True).contiguous()

    def _from_comm(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A collective's result back on the caller's device."""
        if device.type == "cpu":  # the caller may read it at once (a flag, eval's rows)
            return to_host(t)
        return t.to(device, non_blocking=True)

    # -- tensor collectives ----------------------------------------------------------------

    def all_reduce(self, t: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """``t`` reduced over ranks (a new tensor on ``t``'s device; no host sync)."""
        if not self.active:
            return t.detach().clone()
        self._check_peers()
        buf = self._to_comm(t)
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
        if op == "mean":
            buf /= self.world
        return self._from_comm(buf, t.device)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape everywhere) concatenated along dim 0 in rank order."""
        if not self.active:
            return t.detach().clone()
        self._check_peers()
        buf = self._to_comm(t)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return self._from_comm(torch.cat(parts, dim=0), t.device)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of ``t`` (``[world * B, ...]``), this rank's ``B`` rows only."""
        if not self.active:
            return t.detach().clone()
        self._check_peers()
        buf = self._to_comm(t)
        local = buf.shape[0] // self.world
        if self.device.type == "cuda":
            out = torch.empty((local, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
            dist.reduce_scatter_tensor(out, buf, op=dist.ReduceOp.SUM)
        else:  # gloo has no reduce_scatter_tensor: all-reduce and keep the own slice
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            out = buf[self.rank * local:(self.rank + 1) * local]
        return self._from_comm(out, t.device)

    def all_gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`all_gather`, differentiably: backward hands each rank the summed gradient
        of its own rows (what DDP's averaging needs for the exact full-batch gradient)."""
        if self.world == 1:  # also what a simulated world (the planner's) relies on
            return t
        return _GatherWithGrad.apply(t, self)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Like :meth:`all_gather`, but ranks may hold different numbers of rows."""
        if not self.active:
            return t.detach().clone()
        n = torch.tensor([t.shape[0]], device=t.device)
        counts = [int(c) for c in self.read(self.all_gather(n))]
        padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t.detach()
        full = self.all_gather(padded)
        step = max(counts)
        return torch.cat([full[r * step: r * step + c] for r, c in enumerate(counts)], dim=0)

    # -- host-side helpers -----------------------------------------------------------------

    def read(self, t: torch.Tensor) -> list[float]:
        """The values of ``t`` on the host: the one place a caller waits for the device."""
        return to_host(t).reshape(-1).tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (picklable objects; a one-item list alone)."""
        if not self.active:
            return [obj]
        self._check_peers()
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            self._check_peers()
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (collective; reads one number on the host)."""
        if not self.active:
            return bool(flag)
        return self.read(self.all_reduce(torch.tensor([1.0 if flag else 0.0]), "max"))[0] > 0

    # -- failure agreement -------------------------------------------------------------------

    @contextlib.contextmanager
    def agreement(self, what: str) -> Iterator[None]:
        """Run a block that may fail on one rank only, so that every rank fails with it.

        Every collective inside is preceded by a status exchange; an exception on any rank
        makes every rank raise :class:`PeerError` naming the failed rank(s) and their error.
        Blocks must not nest across ranks differently (same collectives on every rank).
        """
        if not self.active:
            yield
            return
        self._agreements.append(what)
        try:
            yield
        except PeerError:
            self._agreements.pop()
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank below
            self._agreements.pop()
            self._fail(what, e)
        else:
            self._agreements.pop()
            self._check_peers(what)

    def _status(self, failed: bool) -> bool:
        flag = torch.tensor([1.0 if failed else 0.0])
        buf = self._to_comm(flag)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return float(to_host(buf).item()) > 0

    def _check_peers(self, what: str | None = None) -> None:
        if what is None and not self._agreements:
            return
        if self._status(False):
            self._raise_with_messages(what or self._agreements[-1], None)

    def _fail(self, what: str, error: BaseException) -> None:
        self._status(True)
        message = f"{type(error).__name__}: {error}"
        self._raise_with_messages(what, (message, traceback.format_exc()), cause=error)

    def _raise_with_messages(self, what: str, mine: tuple[str, str] | None, cause: BaseException | None = None) -> None:
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        failed = {r: m for r, m in enumerate(gathered) if m is not None}
        lines = "; ".join(f"rank {r}: {m[0]}" for r, m in failed.items())
        raise PeerError(f"{what} failed on rank(s) {sorted(failed)}: {lines}") from cause


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm) -> torch.Tensor:  # type: ignore[override]
        ctx.comm = comm
        return comm.all_gather(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.comm.reduce_scatter(grad.contiguous()), None


_current: Comm | None = None


def current() -> Comm:
    """The process's :class:`Comm` (set by :func:`install`; else one built from the default group).

    The losses reach collectives through this, so that they need no plumbing.
    """
    global _current
    if _current is not None and _current.simulated:
        return _current
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    if _current is None or _current.active != (initialized and world > 1) or _current.world != world:
        rank = dist.get_rank() if world > 1 else 0
        _current = Comm(DistEnv(rank=rank, world_size=world), _default_compute())
    return _current


def install(comm: Comm | None) -> Comm | None:
    """Make ``comm`` the process's :func:`current` one (the trainer does, with its device);
    ``None`` forgets it (when the process group goes away). Returns the one installed before."""
    global _current
    before, _current = _current, comm
    return before


def _default_compute() -> torch.device:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
