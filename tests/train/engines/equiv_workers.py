"""Helpers for the exactness tests: the ``orbit-micro`` CLIP, a fixed global sample
stream, and a training loop run both in the test process and in spawned gloo workers.

Everything here is a module-level function so ``tests.distutil.run_distributed``
can pickle it. Results cross the process boundary as numpy arrays: torch tensors
would travel through shared-memory handles that vanish when the worker exits.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from train.core.config import Config, ModelConfig
from train.data.batch import Batch
from train.core.distenv import DistEnv
from train.engines import DDPEngine, EngineParts, build_engine
from train.objective.gather import all_gather_no_grad
from train.objective import tiled
from train.objective.loss import ClipLoss, SigLipLoss
from train.model.factory import build_model

ARCH = "orbit-micro"
GLOBAL_BATCH, STEPS = 8, 4
SIGLIP_BIAS = -10.0
CLIP_GRAD = 1.0
BLOCK = 3
"""Tiled-loss block in these tests: several blocks, and batches (8, 4, 2) that are not multiples."""
VARIANTS = ("tiled", "plain", "broken-gather", "broken-lse")
"""The loss of a case: the default (tiled, block :data:`BLOCK`), the plain reference loss, and
two negative controls: a gather without gradient, a tiled CLIP loss whose log-sum-exp leaves
out the last block of columns."""


@contextlib.contextmanager
def broken_lse() -> Iterator[None]:
    """Negative control: the tiled CLIP loss forgets the last column block in its log-sum-exp."""
    real = tiled._row_lse

    def leaky(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
        keep = (y.shape[0] - 1) // block * block or y.shape[0]
        return real(x, y[:keep], scale, block)

    tiled._row_lse = leaky
    try:
        yield
    finally:
        tiled._row_lse = real


def make_model(kind: str = "clip", patch_dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """A deterministic ``orbit-micro`` CLIP in train mode (with a logit bias for SigLIP)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name=ARCH, patch_dropout=patch_dropout,
                      init_logit_bias=SIGLIP_BIAS if kind == "siglip" else None)
    return build_model(cfg).model


def _dims(model: torch.nn.Module) -> tuple[int, int, int]:
    size = model.visual.image_size
    return (size[0] if isinstance(size, (tuple, list)) else size), model.context_length, model.vocab_size


def sample(i: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Global sample ``i``: a fixed random image and token row.

    The end-of-text token is the largest id, as open_clip pools the text at the argmax.
    """
    size, ctx, vocab = _dims(model)
    g = torch.Generator().manual_seed(1000 + i)
    image = torch.randn(3, size, size, generator=g)
    length = 3 + i % (ctx - 4)
    tokens = torch.zeros(ctx, dtype=torch.long)
    tokens[:length] = torch.randint(1, vocab - 1, (length,), generator=g)
    tokens[length] = vocab - 1
    return image, tokens


def make_batch(step: int, rank: int, world: int, model: torch.nn.Module, global_batch: int = GLOBAL_BATCH) -> Batch:
    """Rank ``rank``'s contiguous slice of global step ``step`` (DESIGN.md's synthetic contract)."""
    local = global_batch // world
    start = step * global_batch + rank * local
    items = [sample(i, model) for i in range(start, start + local)]
    keys = [str(i) for i in range(start, start + local)]
    return Batch(torch.stack([x for x, _ in items]), torch.stack([t for _, t in items]), keys)


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it saw at its first step."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], **kw: Any) -> None:
        super().__init__([p for _, p in named], **kw)
        self._names = [n for n, _ in named]
        self.first_grads: dict[str, np.ndarray] | None = None

    def step(self, closure: Any = None) -> Any:
        if self.first_grads is None:
            params = self.param_groups[0]["params"]
            self.first_grads = {  # a missing gradient is recorded as zeros, to be compared and caught
                n: p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
                for n, p in zip(self._names, params)
            }
        return super().step(closure)


def make_engine(model: torch.nn.Module, rank: int, world: int, kind: str, accum: int,
                variant: str | bool = "tiled", precision: str = "fp32") -> DDPEngine:
    """The engine the trainer would build (AdamW + warm-up), with the loss ``variant`` of
    :data:`VARIANTS` (``True`` = ``broken-gather``, ``False`` = ``tiled``, as older callers say)."""
    variant = {True: "broken-gather", False: "tiled"}.get(variant, variant)  # type: ignore[call-overload]
    if variant not in VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}")
    opt = RecordingAdamW(list(model.named_parameters()), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    env = DistEnv(rank=rank, world_size=world)
    cfg = Config()
    cfg.loss.kind, cfg.loss.block_size, cfg.train.accum_steps, cfg.train.precision = kind, BLOCK, accum, precision
    cfg.optim.clip_grad_norm = CLIP_GRAD
    parts = EngineParts.from_config(cfg, model, opt, sched, env, "cpu")
    if variant == "broken-gather":
        parts.loss_fn = (ClipLoss if kind == "clip" else SigLipLoss)(gather_fn=all_gather_no_grad)
        return DDPEngine(parts)
    if variant == "plain":
        parts.loss_fn = (ClipLoss if kind == "clip" else SigLipLoss)()
        return DDPEngine(parts)
    assert isinstance(parts.loss_fn, (tiled.TiledClipLoss, tiled.TiledSigLipLoss)), "the default loss is tiled"
    return build_engine(cfg.train.engine, parts)


def _count_reductions(engine: DDPEngine) -> list[int]:
    """Make DDP count its gradient-bucket all-reduces (one sync per step is the contract)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    def hook(state, bucket):  # noqa: ANN001 - DDP rejects (string) annotations here
        calls[0] += 1
        return allreduce_hook(None, bucket)

    engine._wrapped.register_comm_hook(None, hook)
    return calls


def train_case(rank: int, world: int, init_state: dict, kind: str, accum: int,
               variant: str | bool = "tiled", steps: int = STEPS, precision: str = "fp32") -> dict[str, Any]:
    """Train a fresh model from ``init_state`` on this rank's slices of the global stream.

    Returns:
        ``params`` (final, numpy), ``first_grads`` (after sync + clipping, numpy), and
        per-step ``loss`` / ``grad_norm`` / ``logit_scale`` as reported by the engine, and
        ``reductions_per_step`` (DDP bucket all-reduces; 0 on one process).
    """
    model = make_model(kind)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in init_state.items()})
    engine = make_engine(model, rank, world, kind, accum, variant, precision)
    bucket_reductions = _count_reductions(engine) if world > 1 else [0]
    with broken_lse() if variant == "broken-lse" else contextlib.nullcontext():
        metrics = [engine.step(make_batch(t, rank, world, model)) for t in range(steps)]
    return {
        "params": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
        "first_grads": engine.optimizer.first_grads,
        "reductions_per_step": bucket_reductions[0] / steps,
        **{m: [float(x[m]) for x in metrics] for m in ("loss", "grad_norm", "logit_scale")},
    }


def _rank_disagreement(params: dict[str, np.ndarray]) -> float:
    # After DDP every rank must hold bit-identical parameters.
    flat = torch.cat([torch.from_numpy(v).flatten().float() for v in params.values()])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    return max(float((p - flat).abs().max()) for p in parts)


def equivalence_worker(
    rank: int, world: int, init_states: dict, cases: list[tuple], ckpt_folder: str | None = None
) -> dict | None:
    """Run each ``(name, kind, accum, variant[, precision])`` case; rank 0 returns ``{name: result}``.

    Each result also carries ``rank_disagreement`` (max |param difference| between ranks).
    With ``ckpt_folder``, :func:`checkpoint_roundtrip` runs too (under ``"checkpoint"``);
    one spawn for both saves the processes' start-up time.
    """
    out = {}
    for name, kind, accum, variant, *precision in cases:
        res = train_case(rank, world, init_states[kind], kind, accum, variant, precision=(precision or ["fp32"])[0])
        res["rank_disagreement"] = _rank_disagreement(res["params"])
        out[name] = res
    if ckpt_folder is not None:
        out["checkpoint"] = checkpoint_roundtrip(rank, world, init_states["clip"], ckpt_folder, accum=2)
    return out if rank == 0 else None


def checkpoint_roundtrip(rank: int, world: int, init_state: dict, folder: str, accum: int = 1) -> dict | None:
    """2 steps, save, 2 more steps; then a fresh engine loads the save and does the same 2 steps.

    Rank 0 returns both final parameter sets, the ``extra`` read back and the files written.
    """
    model = make_model("clip")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in init_state.items()})
    engine = make_engine(model, rank, world, "clip", accum)
    for t in range(2):
        engine.step(make_batch(t, rank, world, model))
    engine.save_checkpoint(folder, {"step": 2, "note": "hello"})
    for t in range(2, 4):
        engine.step(make_batch(t, rank, world, model))
    straight = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    fresh = make_model("clip", seed=123)  # different init: everything must come from the files
    engine2 = make_engine(fresh, rank, world, "clip", accum)
    extra = engine2.load_checkpoint(folder)
    for t in range(2, 4):
        engine2.step(make_batch(t, rank, world, fresh))
    resumed = {k: v.detach().numpy().copy() for k, v in fresh.state_dict().items()}
    if rank != 0:
        return None
    return {"straight": straight, "resumed": resumed, "extra": extra,
            "files": sorted(p.name for p in Path(folder).iterdir())}
