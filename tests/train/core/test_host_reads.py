"""Device→host reads wait for their own copy.

On a GPU a ``.to("cpu", non_blocking=True)`` of a CUDA tensor returns at once with a
pinned host buffer that the copy fills *later*; reading it (``.tolist()``, ``.item()``, a
gloo collective) before a synchronization sees whatever the buffer held. A CPU machine
cannot show this: every copy there is finished when it returns. :class:`AsyncDevice`
fakes such a device: tensors moved to it (``torch.device("meta")`` stands for it) are
marked, and a non-blocking copy of a marked tensor to the host returns a buffer of
:data:`STALE` that only ``torch.cuda.synchronize()`` fills; blocking copies and reads of a
marked tensor itself wait, as on CUDA. A fake process group of two identical ranks stands
behind the collectives. The stop flag, ``Comm.any``, the peak-memory metric, the metric
means and ``gather_rows`` must all read the true values.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import train.loop.metrics as metrics_mod
from train.core.collectives import Comm, to_host
from train.core.distenv import DistEnv
from train.core.rundir import RunDir

STALE = -7.0  # what a pinned buffer holds before its copy lands
DEVICE = torch.device("meta")  # stands for the asynchronous device


class OnDevice(torch.Tensor):
    """A tensor living on the fake asynchronous device (its values are real)."""


def _target(args: tuple, kwargs: dict) -> torch.device | None:
    for a in list(args[1:]) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
    return None


class AsyncDevice(TorchFunctionMode):
    """Copies to/from the fake device; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stale_copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            src, dst = args[0], _target(args, kwargs)
            if dst == DEVICE:
                return src.detach().as_subclass(torch.Tensor).clone().as_subclass(OnDevice)
            if isinstance(src, OnDevice) and dst is not None and dst.type == "cpu":
                true = src.as_subclass(torch.Tensor).clone()
                if not kwargs.get("non_blocking", False):
                    return true
                self.stale_copies += 1
                host = torch.full_like(true, STALE)
                self.pending.append((host, true))
                return host
        if func is torch.Tensor.cpu and isinstance(args[0], OnDevice):
            return args[0].as_subclass(torch.Tensor).clone()
        return func(*args, **kwargs)

    def synchronize(self, *_: Any) -> None:
        """What ``torch.cuda.synchronize`` does: every copy issued so far has landed."""
        for host, true in self.pending:
            host.copy_(true)
        self.pending.clear()


def _fake_collectives(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    """Collectives of ``world`` ranks that all hold this rank's values (in place, like NCCL)."""

    def all_reduce(t, op=dist.ReduceOp.SUM, **_):  # noqa: ANN001
        if op == dist.ReduceOp.SUM:
            t.mul_(world)

    def all_gather(parts, t, **_):  # noqa: ANN001
        for p in parts:
            p.copy_(t)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch):
    mode = AsyncDevice()
    monkeypatch.setattr(torch.cuda, "synchronize", mode.synchronize)
    _fake_collectives(monkeypatch, world=2)
    with mode:
        yield mode


def _comm(comm_device: torch.device) -> Comm:
    """A 2-rank Comm whose collectives run on ``comm_device`` (no process group needed)."""
    comm = Comm(DistEnv())
    comm.env, comm.active, comm.device = DistEnv(rank=0, world_size=2), True, comm_device
    return comm


def test_the_fake_device_shows_a_stale_non_blocking_read(device):
    # The fake must be able to fail: an unsynchronized non-blocking copy reads STALE.
    x = torch.tensor([1.0, 2.0]).to(DEVICE)
    assert x.to("cpu", non_blocking=True).tolist() == [STALE, STALE]
    assert to_host(x).tolist() == [1.0, 2.0]


def test_comm_any_and_gather_rows_of_host_tensors_over_a_device_comm(device):
    # NCCL: the comm device is the GPU; a host flag or eval's CPU rows come back from it.
    comm = _comm(DEVICE)
    assert comm.any(True) is True
    rows = torch.arange(6.0).reshape(3, 2)
    assert comm.gather_rows(rows).tolist() == rows.tolist() * 2
    assert comm.read(comm.all_reduce(torch.tensor([1.5, 2.0]), "mean")) == [1.5, 2.0]


def test_device_tensors_reach_a_host_comm_with_their_values(device):
    # gloo with a CUDA compute device: the collective reads the host copy at once.
    comm = _comm(torch.device("cpu"))
    on_device = torch.tensor([3.0, 4.0]).to(DEVICE)
    assert comm.read(comm.all_reduce(on_device, "mean")) == [3.0, 4.0]
    assert comm.read(comm.all_gather(on_device)) == [3.0, 4.0, 3.0, 4.0]


@pytest.mark.parametrize("comm_device", [DEVICE, torch.device("cpu")], ids=["nccl", "gloo"])
def test_metric_flush_reads_stop_flag_peak_memory_and_means(device, monkeypatch, tmp_path, comm_device):
    monkeypatch.setattr(metrics_mod, "peak_memory_gb", lambda _device: 2.5)
    logger = metrics_mod.MetricLogger(RunDir(tmp_path / "run"), _comm(comm_device), DEVICE, total_steps=10,
                                      log_every=2, progress=False)
    try:
        for step, loss in ((1, 0.5), (2, 1.5)):
            out = {k: torch.tensor(v).to(DEVICE) for k, v in {"loss": loss, "finite": 1.0}.items()}
            logger.record(step, out, [f"k{step}"], 0.0)
        agreed = logger.flush({"stop": True})
    finally:
        logger.close()
    assert agreed == {"stop": True}
    assert logger.last["peak_mem_gb"] == 2.5
    assert logger.last["loss"] == pytest.approx(1.0)
    assert logger.skipped_steps == 0
