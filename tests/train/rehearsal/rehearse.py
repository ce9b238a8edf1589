"""Rehearse the CUDA path on a CPU-only torch: ``python rehearse.py --shim LIB SCENARIO ...``.

The shim (``fake_cuda.cpp``, built by ``shim.py``) gives the CPU build a CUDA device guard
and CUDA hooks; it must be loaded before ``import torch``, hence a process of its own.
Every tensor on "cuda" is a FakeTensor (shapes, dtypes and devices, no values), so a CPU
tensor meeting a CUDA one raises as on a GPU, autocast picks bf16 for "cuda", and fused
AdamW runs its CUDA path. Prints one JSON line per scenario: ``status`` is ``ok``,
``skip`` (a piece the fake device cannot run, with the error that shows it) or ``fail``
(traceback); the exit status is 1 when any failed. ``--bug cpu-texts`` keeps the token ids
on the host inside the step, to prove the rehearsal catches device mixing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[3]
CUDA = "cuda:0"


class Unsupported(Exception):
    """A piece the fake device cannot run; the message says why."""


def patch_cuda() -> None:
    """What the Python side of torch asks before using CUDA (the C++ side is the shim)."""
    import torch

    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.is_current_stream_capturing = lambda: False  # optimizers ask (CUDA graphs)


def fake_cuda_module(module: Any, mode: Any) -> Any:
    """Replace every parameter and buffer of ``module`` by a fake CUDA tensor (in place)."""
    import torch
    from torch import nn

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    done: dict[int, Any] = {}  # tied tensors stay tied
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    with unset_fake_temporarily():  # the real parameter's plain tensor
                        real = p.detach()
                    done[id(p)] = nn.Parameter(mode.from_tensor(real).to(CUDA), requires_grad=p.requires_grad)
                m._parameters[name] = done[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = mode.from_tensor(b).to(CUDA)
    assert all(t.device == torch.device(CUDA) for t in module.state_dict().values())
    return module


def micro_config(accum: int, batch: int) -> Any:
    from train.core.config import load_config

    root = tempfile.mkdtemp(prefix="rehearsal-")
    return load_config(None, [f"run.root={root}", "run.name=r", "model.name=orbit-micro", "train.precision=bf16",
                              f"train.accum_steps={accum}", f"data.batch_size={batch}", "optim.lr=1e-3", "train.steps=10", "data.source=synthetic",
                              "optim.warmup_steps=1"])


# -- scenarios ---------------------------------------------------------------------------


def ddp_step(mode: Any, accum: int) -> str:
    """DDPEngine.step at world 1: bf16 autocast, feature cache, fused AdamW with found_inf."""
    import torch

    from train.core.collectives import Comm
    from train.core.distenv import DistEnv
    from train.data.batch import Batch
    from train.engines import EngineParts
    from train.engines.ddp import DDPEngine
    from train.model.factory import build_model
    from train.optim.optimizer import build_optimizer
    from train.optim.schedule import build_scheduler

    cfg = micro_config(accum, batch=8)
    bundle = build_model(cfg.model)
    texts = bundle.tokenizer([f"a photo of scene {i}" for i in range(8)])
    images = torch.randint(0, 256, (8, 3, bundle.image_size, bundle.image_size), dtype=torch.uint8)
    with mode:
        model = fake_cuda_module(bundle.model, mode)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, 10)
        env = DistEnv()
        engine = DDPEngine(EngineParts.from_config(cfg, model, optimizer, scheduler, env, CUDA, Comm(env, CUDA)))
        tower_dtypes: list[torch.dtype] = []
        model.visual.register_forward_hook(lambda m, i, o: tower_dtypes.append(o.dtype))
        tower_inputs: set[tuple[int, str]] = set()
        model.visual.register_forward_pre_hook(lambda m, i: tower_inputs.add((i[0].shape[0], str(i[0].device),
                                                                               i[0].dtype)))
        # Host-resident (fake CPU) uint8 batches, as the loader hands them over: the engine moves
        # them and normalizes them on the device.
        batch = Batch(mode.from_tensor(images), mode.from_tensor(texts), [str(i) for i in range(8)])
        assert batch.images.device.type == "cpu"
        for _ in range(2):
            out = engine.step(batch)
    bad = {k: (str(v.device), v.dtype) for k, v in out.items() if v.device != torch.device(CUDA) or v.dim() != 0}
    assert not bad, f"step outputs not 0-dim on {CUDA}: {bad}"
    assert engine.skip_on_device and optimizer.found_inf.device == torch.device(CUDA)
    assert set(tower_dtypes) == {torch.bfloat16}, f"image tower ran in {set(tower_dtypes)}, not bf16 autocast"
    assert len(tower_dtypes) == 2 * (2 * accum if accum > 1 else 1), tower_dtypes  # cache: no-grad + re-forward
    # One micro-batch at a time reaches the device (the whole batch never sits there as inputs).
    assert tower_inputs == {(8 // accum, CUDA, torch.float32)}, tower_inputs
    state = optimizer.state[model.logit_scale]
    assert state["exp_avg"].device == torch.device(CUDA) and state["exp_avg"].dtype == torch.float32
    assert all(p.grad is None for p in model.parameters())
    return (f"2 steps, accum {accum}: outputs {sorted(out)} on {CUDA}, uint8 micro-batches of {8 // accum} moved "
            f"from the host and normalized there, towers bf16, fused AdamW found_inf on {CUDA}")


def losses_world8(mode: Any) -> str:
    """The tiled losses (one block, several blocks) and the plain ones with the gather with gradient
    at world 8, NCCL and gloo placement."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from train.core import collectives
    from train.core.config import LossConfig
    from train.core.distenv import DistEnv
    from train.objective.loss import ClipLoss, SigLipLoss, build_loss

    world, rank, local, dim = 8, 3, 4, 16
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    checked = []
    try:
        for placement in ("nccl", "gloo"):
            comm = collectives.Comm(DistEnv(rank=rank, world_size=world), CUDA)
            # The fake backend's name maps to the host; NCCL keeps collectives on the GPU.
            comm.device = torch.device(CUDA) if placement == "nccl" else torch.device("cpu")
            collectives.install(comm)
            with mode:
                gathered = comm.all_gather(torch.randn(local, dim, device=CUDA))
                assert gathered.shape == (world * local, dim) and gathered.device == torch.device(CUDA)
                # Tiled (the default) in one block and in several, and the plain reference losses.
                for kind, block in [(k, b) for k in ("clip", "siglip") for b in (4096, 8, None)]:
                    image = torch.randn(local, dim, device=CUDA, requires_grad=True)
                    text = torch.randn(local, dim, device=CUDA, requires_grad=True)
                    scale = torch.full((), 10.0, device=CUDA, requires_grad=True)
                    bias = torch.full((), -10.0, device=CUDA, requires_grad=True) if kind == "siglip" else None
                    loss_fn = build_loss(LossConfig(kind=kind, block_size=block)) if block else \
                        (ClipLoss() if kind == "clip" else SigLipLoss())
                    loss = loss_fn(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale, bias)
                    loss.backward()
                    assert loss.device == torch.device(CUDA) and loss.dim() == 0
                    assert image.grad.shape == image.shape and image.grad.device == torch.device(CUDA)
                    assert scale.grad.device == torch.device(CUDA)
                    checked.append(f"{kind}/{'block ' + str(block) if block else 'plain'}/{placement}")
    finally:
        collectives.install(None)
        dist.destroy_process_group()
    return f"world {world} rank {rank}: {', '.join(checked)} forward+backward on {CUDA}"


def rng_capture(mode: Any) -> str:
    """The feature cache's RNG capture/restore on a CUDA device (no CUDA generator exists here)."""
    import torch

    from train.core.rng import capture_device, restore_device

    state = capture_device(torch.device(CUDA))
    restore_device(state, torch.device(CUDA))
    return f"capture_device({CUDA}) recorded cpu, cuda={'none' if state.cuda is None else 'state'}"


@contextlib.contextmanager
def unsupported(reason: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turn the error that shows a piece cannot run on the fake device into :class:`Unsupported`."""
    try:
        yield
    except errors as e:
        raise Unsupported(f"{reason} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e


def host_reads(mode: Any) -> str:
    """Comm.read / to_host().tolist() of a CUDA tensor (metrics, stop flag, agreements)."""
    import torch
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from train.core.collectives import to_host

    with mode, unsupported("fake tensors have no values to read on the host: only a GPU shows host reads",
                           DataDependentOutputException):
        return str(to_host(torch.ones(2, device=CUDA)).tolist())


def ddp_wrapper(mode: Any) -> str:
    """DistributedDataParallel over fake CUDA parameters at world 8."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        with mode, unsupported("DDP's wrapper reads parameter storage, which fake tensors do not allocate",
                               RuntimeError):
            DistributedDataParallel(fake_cuda_module(torch.nn.Linear(4, 4), mode), device_ids=[0])
    finally:
        dist.destroy_process_group()
    return "DDP wrapped fake parameters"


def pin_memory(mode: Any) -> str:
    """Pinned host memory (the loader's pin_memory)."""
    import torch

    with unsupported("a CPU build of torch has no pinned-memory allocator", RuntimeError):
        torch.empty(4).pin_memory()
    return "pinned"


def broadcast(mode: Any) -> str:
    """dist.broadcast of a CUDA tensor over the fake process group."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        with mode, unsupported("the fake process group's broadcast asks CUDA for device properties",
                               RuntimeError, AssertionError):
            dist.broadcast(torch.ones(2, device=CUDA), src=0)
    finally:
        dist.destroy_process_group()
    return "broadcast ran"


SCENARIOS: dict[str, Callable[[Any], str]] = {
    "ddp-step-accum1": lambda mode: ddp_step(mode, 1),
    "ddp-step-accum4": lambda mode: ddp_step(mode, 4),
    "losses-world8": losses_world8,
    "rng-capture": rng_capture,
    "host-reads": host_reads,
    "ddp-wrapper": ddp_wrapper,
    "pin-memory": pin_memory,
    "broadcast": broadcast,
}


def inject_bug(name: str) -> None:
    """Reintroduce a device-mixing bug into the product, for the negative test."""
    from train.objective.forward import ForwardOptions

    if name == "cpu-texts":
        move = ForwardOptions.to_device

        def leave_texts_on_host(self: ForwardOptions, images: Any, texts: Any) -> tuple[Any, Any]:
            return move(self, images, texts)[0], texts

        ForwardOptions.to_device = leave_texts_on_host  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shim", required=True, help="the fake CUDA library built by shim.py")
    ap.add_argument("--bug", choices=["cpu-texts"], help="inject a device-mixing bug")
    ap.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = ap.parse_args(argv)
    ctypes.CDLL(args.shim, mode=ctypes.RTLD_GLOBAL)  # before torch: its device registries are filled now
    sys.path.insert(0, str(REPO))
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.set_num_threads(1)
    patch_cuda()
    if args.bug:
        inject_bug(args.bug)
    failed = False
    for name in args.scenarios:
        t0 = time.perf_counter()
        record: dict[str, Any] = {"scenario": name}
        try:
            record.update(status="ok", detail=SCENARIOS[name](FakeTensorMode()))
        except Unsupported as e:
            record.update(status="skip", detail=str(e))
        except Exception as e:  # noqa: BLE001 - reported to the test with its traceback
            failed = True
            record.update(status="fail", error=type(e).__name__, detail=traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
