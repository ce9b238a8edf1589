"""The collectives contract: every tensor reaches ``torch.distributed`` on the communication device.

On a CPU machine the compute and the communication device are both the CPU, so a metric
tensor made on the host and handed to NCCL (a crash on GPUs) looks fine here. The test
below makes the two differ: :meth:`Comm._to_comm` is replaced by a move onto a fake
"communication device" (a marker tensor subclass), and every ``torch.distributed``
collective the code calls checks that its tensors carry the marker. A whole 2-rank training
run (metrics, stop flag, losses' gather, checkpoints, evaluation) must pass it.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distutil import run_distributed
from tests.test_layers import COLLECTIVES
from train.core.collectives import Comm, PeerError, comm_device_for
from train.core.distenv import DistEnv


class OnCommDevice(torch.Tensor):
    """A tensor that has been moved to the (fake) communication device."""


def install_fake_comm_device() -> list[str]:
    """Route Comm's placement through the marker and make every collective check for it.

    Returns the list that collects violations (and, prefixed ``ok:``, checked calls).
    """
    log: list[str] = []

    def to_comm(self: Comm, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().contiguous().as_subclass(OnCommDevice)

    def from_comm(self: Comm, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return t.as_subclass(torch.Tensor).clone().to(device)

    def unwrap(x):
        if isinstance(x, torch.Tensor):
            return x.as_subclass(torch.Tensor)  # same storage: in-place results land in the marked tensor
        if isinstance(x, list):
            return [unwrap(v) for v in x]
        return x

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    def checked(name: str, fn):
        def call(*args, **kwargs):
            where = inspect.stack()[1]
            site = f"{Path(where.filename).name}:{where.lineno}"
            for t in tensors(list(args) + list(kwargs.values())):
                if not isinstance(t, OnCommDevice):
                    log.append(f"{name} at {site}: {tuple(t.shape)} tensor on the compute device")
            log.append(f"ok:{name}")
            return fn(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()})
        return call

    Comm._to_comm = to_comm  # type: ignore[method-assign]
    Comm._from_comm = from_comm  # type: ignore[method-assign]
    for name in COLLECTIVES:
        if hasattr(dist, name) and name not in ("all_gather_object", "broadcast_object_list"):
            setattr(dist, name, checked(name, getattr(dist, name)))
    return log


def _train_two_ranks(rank: int, world: int, root: str) -> list[str]:
    from tests.train.test_trainer import micro_cfg
    from train.trainer import run

    log = install_fake_comm_device()
    cfg = micro_cfg(Path(root) / "run", "train.steps=4", "train.log_every=2", "train.checkpoint_every=2",
                    "data.batch_size=4", "train.accum_steps=2", "eval.benchmarks=[demo]")
    run(cfg, DistEnv(rank=rank, world_size=world))
    return log


def test_every_collective_of_a_training_run_gets_comm_device_tensors(tmp_path):
    logs = run_distributed(_train_two_ranks, 2, str(tmp_path), timeout=300)
    for log in logs:
        violations = [line for line in log if not line.startswith("ok:")]
        assert violations == []
        checked = {line[3:] for line in log if line.startswith("ok:")}
        assert {"all_reduce", "all_gather", "barrier"} <= checked  # metrics/loss gather/checkpoints went through


def test_comm_device_follows_the_backend():
    assert comm_device_for("nccl", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert comm_device_for("gloo", torch.device("cuda", 0)) == torch.device("cpu")
    assert comm_device_for(None, torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="NCCL"):
        comm_device_for("nccl", torch.device("cpu"))


def test_single_process_comm_is_the_identity():
    comm = Comm(DistEnv())
    x = torch.arange(4.0)
    assert not comm.active and comm.world == 1 and comm.rank == 0
    assert torch.equal(comm.all_reduce(x, "mean"), x) and torch.equal(comm.gather_rows(x), x)
    assert comm.all_gather_with_grad(x) is x and comm.all_gather_object("a") == ["a"]
    with comm.agreement("nothing"):
        comm.barrier()


def _collectives(rank: int, world: int) -> dict:
    comm = Comm(DistEnv(rank=rank, world_size=world))
    x = torch.full((rank + 1, 2), float(rank))
    grad_in = torch.ones(3, 2, requires_grad=True)
    gathered = comm.all_gather_with_grad(grad_in * (rank + 1))
    (gathered * torch.arange(6.0).view(6, 1)).sum().backward()
    return {
        "sum": comm.all_reduce(torch.tensor([1.0 + rank]), "sum").tolist(),
        "mean": comm.all_reduce(torch.tensor([1.0 + rank]), "mean").tolist(),
        "max": comm.all_reduce(torch.tensor([1.0 + rank]), "max").tolist(),
        "rows": comm.gather_rows(x).tolist(),
        "any": comm.any(rank == 1),
        "grad": grad_in.grad[:, 0].tolist(),
    }


def test_collectives_values_on_two_ranks():
    out = run_distributed(_collectives, 2, timeout=120)
    for r, o in enumerate(out):
        assert o["sum"] == [3.0] and o["mean"] == [1.5] and o["max"] == [2.0] and o["any"] is True
        assert o["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # 1 row from rank 0, 2 from rank 1
        # d/dx of sum_i w_i * gathered_i over both ranks' losses: rows r*3..r*3+2, times (r+1).
        assert o["grad"] == [(r + 1) * 2 * (3 * r + i) for i in range(3)]


def _fail_on_rank0(rank: int, world: int) -> dict:
    comm = Comm(DistEnv(rank=rank, world_size=world))
    start = time.monotonic()
    try:
        with comm.agreement("the evaluation"):
            if rank == 0:
                raise OSError("disk full while writing a picture")
            comm.all_gather(torch.ones(2))  # rank 1 waits here for a partner that never comes
        return {"error": None}
    except PeerError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}


def test_a_failure_on_one_rank_ends_every_rank_with_its_message():
    out = run_distributed(_fail_on_rank0, 2, timeout=60)
    for o in out:
        assert o["error"] and "the evaluation failed on rank(s) [0]" in o["error"]
        assert "OSError: disk full while writing a picture" in o["error"]
        assert o["seconds"] < 10
