"""DeepSpeed engine (``train.engine=deepspeed``): ZeRO 1/2/3 behind the Engine protocol.

Same loss module and same forward/backward (plain or through the micro-batch feature cache,
:func:`train.objective.forward.forward_backward`) as the DDP engine; only the backward and
the update go through DeepSpeed. Inputs reach the device one micro-batch at a time, as
under DDP, and nothing is read on the host inside a step.

Accumulation: DeepSpeed runs with ``gradient_accumulation_steps=1`` and
``train_micro_batch_size_per_gpu=data.batch_size``; the feature cache's re-forwards all
happen inside one DeepSpeed step. Each re-forward is back-propagated with
``engine.backward`` (on ``sum(features * cached_grad)``, whose gradient is exactly the
cached one); all but the last run with ``set_gradient_accumulation_boundary(False)``, the
last with ``True``, then ``engine.step()`` runs once. Without the boundary marks,
deepspeed 0.19.7 drops the earlier micro-batches' gradients under ZeRO-1/2 (measured:
relative error 0.84); with them ZeRO-1 reduces once per step and ZeRO-2/3 reduce-scatter
each re-forward's buckets into the gradient partitions (how DeepSpeed accumulates).

Non-finite gradients: DeepSpeed skips a step only on its fp16 loss scaler's overflow; in
bf16 / fp32 under ZeRO 1-3 a NaN gradient behind a finite loss would reach the optimizer
(measured on 0.19.7: the reported norm stayed finite, the weights became NaN). A tensor
hook on every trainable parameter ANDs ``isfinite(grad).all()`` of each local gradient (as
autograd produces it, before DeepSpeed reduces or partitions it, so the same for every
stage) into a device flag; the flags are min-reduced over ranks (a NaN on one rank reaches
every rank's reduced gradient) and, with the loss, set fused Adam/AdamW's ``found_inf``: the
update is skipped on the device, as under DDP, and the step's ``finite`` output is 0, which
the metrics count as a skipped step (``skipped_steps``).

Checkpoint folder (written into the folder the trainer gives; nothing outside it):
``ds/`` (DeepSpeed's own shards, tag ``ds``), ``latest`` and ``zero_to_fp32.py`` (written by
DeepSpeed), ``model.pt`` (consolidated fp32 open_clip state_dict), ``extra.pt``,
``orbitclip_ds.json`` (stage, world size, reshaped 0-dim parameter names).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from train.core.configbase import ConfigError
from train.core.rundir import CheckpointDir
from train.engines.base import (
    EngineParts, check_parts, keep_implementation_flags, model_on, register_engine, resolve_precision,
)
from train.engines.ddp import grad_norm_, supports_device_skip
from train.engines.deepspeed.config import build_ds_config, write_ds_config
from train.engines.deepspeed.params import assert_no_scalar_params, restore_scalar_shapes, vectorize_scalar_params
from train.objective import ForwardOptions, forward_backward

DS_TAG = "ds"
META_FILE = "orbitclip_ds.json"


def _ds() -> Any:
    import deepspeed  # imported lazily: only runs that pick this engine need it

    return deepspeed


class DeepSpeedEngine:
    """One optimizer step per :meth:`step`, on a ``deepspeed.initialize`` engine.

    Attributes:
        model: the open_clip model (its 0-dim params are ``[1]`` inside; ``state_dict()``
            shows ``[]``). Under ZeRO-3 its parameters are partitioned outside forward:
            use :meth:`consolidated_state_dict` (collective) for the weights.
        optimizer: the torch optimizer passed in (DeepSpeed's wrapper is ``ds.optimizer``).
        scheduler: the LR scheduler passed in (stepped by DeepSpeed, saved in its checkpoint).
        ds: the DeepSpeed engine; ``ds_config``: the JSON it got.
    """

    def __init__(self, parts: EngineParts, write_config: bool = True) -> None:
        deepspeed = _ds()
        t = parts.train
        check_parts(parts)
        if parts.deepspeed.zero_stage == 3 and t.accum_steps > 1:
            # Measured (tests): step 0 matches DDP, later steps' gradients differ by ~0.3% on
            # deepspeed 0.19.7. Refuse rather than train subtly wrong.
            raise ConfigError(
                f"train.engine=deepspeed with deepspeed.zero_stage=3 and train.accum_steps={t.accum_steps} "
                "does not reproduce the full-batch gradient yet; use zero_stage 1/2 or train.accum_steps=1"
            )
        self.env, self.device, self.comm = parts.env, torch.device(parts.device), parts.comm
        self.logit_scale_max = parts.loss.logit_scale_max
        self.zero_stage = parts.deepspeed.zero_stage
        self.loss_fn = parts.loss_fn
        self.model = model_on(parts.model, self.device)
        self.scalar_names = vectorize_scalar_params(self.model)
        assert_no_scalar_params(self.model)
        self.bf16 = resolve_precision(t.precision, self.device) == "bf16"
        self.ds_config = build_ds_config(parts.deepspeed, parts.batch_size, parts.optim.clip_grad_norm, self.bf16,
                                         self.env.world_size)
        if write_config and self.env.is_main:
            write_ds_config(self.ds_config, parts.run_dir)
        if not dist.is_initialized():
            # DeepSpeed needs a process group even on one process; a private store avoids ports.
            if self.env.world_size > 1:
                raise RuntimeError(f"DeepSpeedEngine needs an initialized process group of {self.env.world_size} ranks")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # ZeRO 2/3 read LOCAL_RANK from the environment (set by launchers); a plain
        # `python -m train` on one process has none.
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.skip_on_device = supports_device_skip(self.optimizer)
        self.ds, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=self.ds_config
        )
        self._grads_finite = torch.ones((), dtype=torch.bool, device=self.device)
        for p in self.model.parameters():
            if p.requires_grad:
                p.register_hook(self._watch_grad)
        self.forward = ForwardOptions(
            device=self.device, accum_steps=t.accum_steps, backward=self._backward, no_sync=self._not_boundary,
            input_dtype=torch.bfloat16 if self.bf16 else None, unique_texts=t.unique_texts,
            normalize=parts.normalize,
        )

    # -- one step ---------------------------------------------------------------------

    def _watch_grad(self, grad: torch.Tensor) -> None:
        # In place on a device flag: no host read; reset at the start of each step.
        self._grads_finite.logical_and_(torch.isfinite(grad).all())

    def _backward(self, tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        # engine.backward takes one scalar; d/dt sum(t * g) = g exactly.
        surrogate = sum((t * g).sum() for t, g in zip(tensors, grads))
        self.ds.backward(surrogate)

    @contextlib.contextmanager
    def _not_boundary(self) -> Iterator[None]:
        # The feature cache wraps all but the last re-forward in this (DDP: no_sync).
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward/backward (feature cache if accumulating), DeepSpeed update, clamp.

        Returns:
            ``loss`` (mean over ranks), ``logit_scale`` (0-dim, used in this step),
            ``grad_norm`` (before clipping), ``lr`` (used in this step), ``finite``; all 0-dim
            tensors on the device.
        """
        lr = torch.full((), float(self.optimizer.param_groups[0]["lr"]), device=self.device)
        self.ds.set_gradient_accumulation_boundary(True)
        self._grads_finite.fill_(True)
        loss, scale = forward_backward(self.ds, self.loss_fn, batch.images, batch.texts, self.forward)
        loss = self.comm.all_reduce(loss, "mean")
        grads_finite = self.comm.all_reduce(self._grads_finite.float(), "min") > 0
        norm = self._grad_norm_before_step()
        finite = torch.isfinite(loss) & grads_finite
        if norm is not None:
            finite = finite & torch.isfinite(norm)
        if self.skip_on_device:
            self.optimizer.found_inf = (~finite).float()  # the fused kernel under DeepSpeed's wrapper reads it
        self.ds.step()
        if norm is None:
            norm = self._reported_grad_norm()
            finite = finite & torch.isfinite(norm)
        self._clamp_logit_scale()
        return {"loss": loss, "logit_scale": scale.reshape(()).float(), "grad_norm": norm.detach(), "lr": lr,
                "finite": finite.float()}

    def _grad_norm_before_step(self) -> torch.Tensor | None:
        # Without ZeRO the grads sit on the params (DeepSpeed reports no norm for a plain
        # torch optimizer); with ZeRO they are partitioned and DeepSpeed computes the norm.
        if self.zero_stage > 0 or self.bf16:
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        return grad_norm_(params, None, self.device)

    def _reported_grad_norm(self) -> torch.Tensor:
        """DeepSpeed's global norm as a device tensor (it may hand back a tensor or a float)."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return torch.full((), float("nan"), device=self.device)
        if isinstance(norm, torch.Tensor):
            return norm.detach().to(self.device, torch.float32).reshape(())
        return torch.full((), norm, device=self.device)

    @torch.no_grad()
    def _clamp_logit_scale(self) -> None:
        """open_clip's post-step clamp, applied to the fp32 master *and* the module copy.

        ZeRO keeps fp32 master weights apart from the module's parameters and copies them
        back at the next step, so clamping only ``model.logit_scale`` would be undone.
        """
        from deepspeed.utils import (
            safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param,
        )

        if self.logit_scale_max <= 0:
            raise ValueError(f"loss.logit_scale_max must be > 0, got {self.logit_scale_max}")
        limit = math.log(self.logit_scale_max)
        p = self.model.logit_scale
        # Clamped unconditionally: testing "is it above the limit" first would read the value
        # on the host every step; clamping a 1-element tensor costs nothing.
        master = safe_get_full_fp32_param(p)  # collective under ZeRO; same value on all ranks
        if hasattr(p, "ds_id"):
            # ZeRO-3: the full setter slices past the end for params smaller than the world
            # (deepspeed 0.19.7); a clamp is elementwise, so clamp this rank's shard.
            local = safe_get_local_fp32_param(p)
            safe_set_local_fp32_param(p, local.clamp(max=limit))
        elif master is not None:
            safe_set_full_fp32_param(p, master.clamp(max=limit))
        gather = _ds().zero.GatheredParameters([p], modifier_rank=0) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with gather:
            p.data.clamp_(max=limit)

    # -- weights and checkpoints --------------------------------------------------------

    @contextlib.contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """Under ZeRO-3 gather every parameter for the block (collective); else as is."""
        params = [p for p in self.model.parameters() if hasattr(p, "ds_id")]
        ctx = _ds().zero.GatheredParameters(params, modifier_rank=None) if params else contextlib.nullcontext()
        with ctx:
            yield self.model

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain open_clip state_dict with fp32 master weights, on CPU. Collective.

        Works for every stage (ZeRO-3 shards are gathered); 0-dim parameters come back as
        ``[]``. Every rank must call it; every rank gets the result.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.model.named_parameters(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict().items():
            p = params.get(key)
            if p is None:  # a buffer: never partitioned
                out[key] = value.detach().cpu().clone()
                continue
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # frozen (LiT) or no ZeRO fp32 master: the module copy is it
                gather = _ds().zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
                with gather:
                    full = p.data.detach().float().clone()
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            out[key] = full.reshape(shape).cpu()
        return restore_scalar_shapes(out, self.scalar_names)

    def state_dict(self) -> dict[str, Any]:
        """Not available: ZeRO optimizer state is sharded; see :meth:`save_checkpoint`."""
        raise NotImplementedError(
            "DeepSpeedEngine has no in-memory state_dict (optimizer state is sharded across ranks): "
            "use save_checkpoint/load_checkpoint, or consolidated_state_dict() for the weights"
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Not available; see :meth:`state_dict`."""
        self.state_dict()

    def save_checkpoint(self, path_dir: str | Path, extra: dict[str, Any]) -> None:
        """Every rank writes its DeepSpeed shard into ``path_dir``; rank 0 adds model.pt,
        extra.pt and the metadata. The folder must exist (the trainer publishes it)."""
        ckpt = CheckpointDir(Path(path_dir))
        if not ckpt.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt.path} does not exist (create it first)")
        self.ds.save_checkpoint(str(ckpt.path), tag=DS_TAG, save_latest=True)
        weights = self.consolidated_state_dict()
        if self.env.is_main:
            torch.save(weights, ckpt.model)
            torch.save(extra, ckpt.extra)
            meta = {"zero_stage": self.zero_stage, "world_size": self.env.world_size, "tag": DS_TAG,
                    "scalar_params": self.scalar_names, "bf16": self.bf16}
            (ckpt.path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self.comm.barrier()

    def load_checkpoint(self, path_dir: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler from :meth:`save_checkpoint`; returns ``extra``."""
        ckpt = CheckpointDir(Path(path_dir))
        path = ckpt.path
        missing = [p.name for p in (path / META_FILE, ckpt.extra, path / DS_TAG) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a DeepSpeed checkpoint of ours: missing {', '.join(missing)} "
                "(a DDP checkpoint's model.pt can seed a new run via model.pretrained)"
            )
        meta = json.loads((path / META_FILE).read_text())
        if meta["zero_stage"] != self.zero_stage or meta["world_size"] != self.env.world_size:
            raise RuntimeError(
                f"{path} was written with ZeRO stage {meta['zero_stage']} on {meta['world_size']} ranks; this run has "
                f"stage {self.zero_stage} on {self.env.world_size} ranks. Exact resume needs both equal; to start "
                f"from its weights only, use model.pretrained={ckpt.model}"
            )
        with keep_implementation_flags(self.optimizer):
            loaded, _ = self.ds.load_checkpoint(
                str(path), tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / meta['tag']}")
        return torch.load(ckpt.extra, weights_only=False)


@register_engine("deepspeed")
def _build(parts: EngineParts) -> DeepSpeedEngine:
    return DeepSpeedEngine(parts)
