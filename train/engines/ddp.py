"""The data-parallel engine (``train.engine=ddp``): DDP when world > 1, the bare model otherwise.

A step runs :func:`train.objective.forward.forward_backward` (the feature cache when
``accum_steps > 1``), syncs gradients once, clips, steps optimizer and scheduler, zeroes
gradients and clamps the logit scale. Nothing is read on the host: a non-finite loss or
gradient skips the update on the device (fused Adam/AdamW's ``found_inf``) and is reported
in the step's ``finite`` output, which the metrics read at the next log step.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel

from train.core.phases import phase
from train.core.rundir import CheckpointDir
from train.engines.base import (
    EngineParts, autocast_factory, check_parts, keep_implementation_flags, model_on, register_engine,
)
from train.objective import ForwardOptions, forward_backward
from train.objective.loss import clamp_logit_scale_


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` can skip itself on the device (fused Adam/AdamW read ``found_inf``)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def grad_norm_(params: list[nn.Parameter], max_norm: float | None, device: torch.device) -> torch.Tensor:
    """Total gradient norm before clipping (clipped in place when ``max_norm`` is set)."""
    if not params:
        return torch.zeros((), device=device)
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def fixed_buckets(ddp: DistributedDataParallel) -> DistributedDataParallel:
    """``ddp`` with its final bucket layout from the first step on.

    DDP rebuilds its buckets once, after the first step, in the order gradients became ready;
    a resumed run's first step would then reduce with the initial layout while the
    uninterrupted run used the rebuilt one. Ring all-reduces (gloo, NCCL) add an element's
    shards in an order that depends on its offset in the bucket, so beyond 2 ranks the
    resumed weights would differ in the last bits. Laying the buckets out now, in parameter
    order, leaves nothing to rebuild (no graph walk per step, unlike
    ``find_unused_parameters=True``, which would also keep the layout).
    """
    reducer = ddp.reducer
    reducer._push_all_rebuilt_params()
    reducer._rebuild_buckets()
    return ddp


class DDPEngine:
    """One optimizer step per :meth:`step`; see the module docstring.

    Attributes:
        model: the unwrapped open_clip model (plain state_dict keys).
        optimizer, scheduler: as passed in.
    """

    def __init__(self, parts: EngineParts) -> None:
        t = parts.train
        check_parts(parts)
        self.env, self.device, self.comm = parts.env, torch.device(parts.device), parts.comm
        self.model = model_on(parts.model, self.device)
        self.optimizer, self.scheduler, self.loss_fn = parts.optimizer, parts.scheduler, parts.loss_fn
        self.clip_grad_norm = parts.optim.clip_grad_norm
        self.logit_scale_max = parts.loss.logit_scale_max
        self.skip_on_device = supports_device_skip(self.optimizer)
        wrapped: nn.Module = self.model
        no_sync = contextlib.nullcontext
        if self.env.world_size > 1:
            if not self.comm.active:
                raise RuntimeError(f"DDPEngine needs an initialized process group of {self.env.world_size} ranks")
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            wrapped = fixed_buckets(DistributedDataParallel(self.model, device_ids=ids))
            no_sync = wrapped.no_sync
        self._wrapped = wrapped
        self.forward = ForwardOptions(
            device=self.device, accum_steps=t.accum_steps, autocast=autocast_factory(t.precision, self.device),
            no_sync=no_sync, cache_module=self.model, unique_texts=t.unique_texts,
            normalize=parts.normalize,
        )

    def step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward/backward, one gradient sync, clip, update (skipped on the device if not finite).

        Returns:
            ``loss`` (mean over ranks = the full-batch loss), ``logit_scale`` (used in this
            step), ``grad_norm`` (before clipping), ``lr`` (used in this step), ``finite``.
        """
        # torch.full launches a fill with the value as argument: no host-device copy/sync.
        lr = torch.full((), float(self.optimizer.param_groups[0]["lr"]), device=self.device)
        loss, scale = forward_backward(self._wrapped, self.loss_fn, batch.images, batch.texts, self.forward)
        with phase("collectives"):  # DDP's gradient all-reduce overlaps the backward, inside it
            loss = self.comm.all_reduce(loss, "mean")
        with phase("optimizer"):
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = grad_norm_(params, self.clip_grad_norm, self.device)
            finite = torch.isfinite(loss) & torch.isfinite(norm)
            if self.skip_on_device:
                self.optimizer.found_inf = (~finite).float()  # read by the fused kernel
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale_(self.model, self.logit_scale_max)
        return {"loss": loss, "logit_scale": scale, "grad_norm": norm.detach(), "lr": lr, "finite": finite.float()}

    # -- weights and checkpoints --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"model": plain open_clip state_dict, "optimizer": ..., "scheduler": ... | None}``."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a stray ``module.`` prefix is tolerated)."""
        model_state = dict(state["model"])
        consume_prefix_in_state_dict_if_present(model_state, "module.")
        self.model.load_state_dict(model_state)
        with keep_implementation_flags(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])
        if (state.get("scheduler") is None) != (self.scheduler is None):
            raise ValueError("checkpoint and engine disagree on whether there is an LR scheduler")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def full_model(self) -> ContextManager[nn.Module]:
        """Nothing is sharded under DDP: the model itself."""
        return contextlib.nullcontext(self.model)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the model's state_dict (plain open_clip keys)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, path_dir: str | Path, extra: dict[str, Any]) -> None:
        """Rank 0 writes model.pt, optimizer.pt, scheduler.pt (if any), extra.pt.

        The folder must exist; atomic, durable publication is :mod:`train.loop.checkpoint`'s
        job. Every rank must call this (it ends with a barrier).
        """
        ckpt = CheckpointDir(Path(path_dir))
        if self.env.is_main:
            if not ckpt.path.is_dir():
                raise FileNotFoundError(f"checkpoint folder {ckpt.path} does not exist (create it first)")
            state = self.state_dict()
            torch.save(state["model"], ckpt.model)
            torch.save(state["optimizer"], ckpt.optimizer)
            if state["scheduler"] is not None:
                torch.save(state["scheduler"], ckpt.scheduler)
            torch.save(extra, ckpt.extra)
        self.comm.barrier()

    def load_checkpoint(self, path_dir: str | Path) -> dict[str, Any]:
        """Every rank loads the folder written by :meth:`save_checkpoint`; returns ``extra``."""
        ckpt = CheckpointDir(Path(path_dir))
        needed = [ckpt.model, ckpt.optimizer, ckpt.extra] + ([ckpt.scheduler] if self.scheduler is not None else [])
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {ckpt.path} is incomplete: missing {', '.join(missing)}")
        # Optimizer/scheduler/extra are our own files and may hold any picklable trainer
        # state (e.g. data-loader positions), hence weights_only=False for them.
        state = {
            "model": torch.load(ckpt.model, map_location=self.device, weights_only=True),
            "optimizer": torch.load(ckpt.optimizer, map_location=self.device, weights_only=False),
            "scheduler": torch.load(ckpt.scheduler, weights_only=False) if self.scheduler is not None else None,
        }
        self.load_state_dict(state)
        return torch.load(ckpt.extra, weights_only=False)


@register_engine("ddp")
def _build(parts: EngineParts) -> DDPEngine:
    return DDPEngine(parts)
