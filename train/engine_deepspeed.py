"""DeepSpeed engine (``train.engine=deepspeed``): ZeRO 1/2/3 behind the Engine protocol.

Same loss module and same micro-batch feature cache as the DDP engine
(:mod:`train.gradcache`); only the backward and the update go through DeepSpeed.

Accumulation: DeepSpeed runs with ``gradient_accumulation_steps=1`` and
``train_micro_batch_size_per_gpu=data.batch_size``; the feature cache's re-forwards all
happen inside one DeepSpeed step. Each re-forward is back-propagated with
``engine.backward`` (on ``sum(features * cached_grad)``, whose gradient is exactly the
cached one); all but the last run with ``set_gradient_accumulation_boundary(False)``, the
last with ``True``, then ``engine.step()`` runs once. Without the boundary marks,
deepspeed 0.19.7 drops the earlier micro-batches' gradients under ZeRO-1/2 (measured:
relative error 0.84); with them ZeRO-1 reduces once per step and ZeRO-2/3 reduce-scatter
each re-forward's buckets into the gradient partitions (how DeepSpeed accumulates).

Checkpoint folder (written into the folder the trainer gives; nothing outside it):
``ds/`` (DeepSpeed's own shards, tag ``ds``), ``latest`` and ``zero_to_fp32.py`` (written by
DeepSpeed), ``model.pt`` (consolidated fp32 open_clip state_dict), ``extra.pt``,
``orbitclip_ds.json`` (stage, world size, reshaped 0-dim parameter names).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from train.config import Config
from train.distenv import DistEnv
from train.ds_config import build_ds_config, resolve_bf16, write_ds_config
from train.ds_params import assert_no_scalar_params, restore_scalar_shapes, vectorize_scalar_params
from train.engine import EXTRA_FILE, MODEL_FILE, register_engine
from train.gather import mean_over_ranks
from train.gradcache import cached_forward_backward, plain_forward_backward
from train.loss import build_loss

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

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        env: DistEnv,
        device: torch.device,
        write_config: bool = True,
    ) -> None:
        deepspeed = _ds()
        if cfg.train.accum_steps < 1:
            raise ValueError(f"train.accum_steps must be >= 1, got {cfg.train.accum_steps}")
        if cfg.deepspeed.zero_stage == 3 and cfg.train.accum_steps > 1:
            # Measured (tests/test_deepspeed.py): step 0 matches DDP, later steps' gradients
            # differ by ~0.3% on deepspeed 0.19.7. Refuse rather than train subtly wrong.
            raise NotImplementedError(
                f"train.engine=deepspeed with deepspeed.zero_stage=3 and train.accum_steps={cfg.train.accum_steps} "
                "does not reproduce the full-batch gradient yet; use zero_stage 1/2 or train.accum_steps=1"
            )
        self.env, self.device = env, torch.device(device)
        self.accum_steps = cfg.train.accum_steps
        self.unique_texts = cfg.train.unique_texts
        self.logit_scale_max = cfg.loss.logit_scale_max
        self.zero_stage = cfg.deepspeed.zero_stage
        self.loss_fn = build_loss(cfg.loss)
        self.model = model.to(self.device)
        self.scalar_names = vectorize_scalar_params(self.model)
        assert_no_scalar_params(self.model)
        self.ds_config = build_ds_config(cfg, env.world_size, self.device.type)
        self.bf16 = resolve_bf16(cfg, self.device.type)
        if write_config and env.is_main:
            write_ds_config(self.ds_config, cfg.run.dir)
        if not dist.is_initialized():
            # DeepSpeed needs a process group even on one process; a private store avoids ports.
            if env.world_size > 1:
                raise RuntimeError(f"DeepSpeedEngine needs an initialized process group of {env.world_size} ranks")
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.ds, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )

    # -- one step ---------------------------------------------------------------------

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
            ``grad_norm`` (before clipping), ``lr`` (used in this step).
        """
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        images = batch.images.to(self.device, dtype=dtype, non_blocking=True)
        texts = batch.texts.to(self.device, non_blocking=True)
        lr = torch.tensor(float(self.optimizer.param_groups[0]["lr"]))
        self.ds.set_gradient_accumulation_boundary(True)
        if self.accum_steps == 1:
            loss, scale = plain_forward_backward(
                self.ds, self.loss_fn, images, texts, contextlib.nullcontext, self._backward, self.unique_texts
            )
        else:
            loss, scale = cached_forward_backward(
                self.ds, self.ds, self.loss_fn, images, texts, self.accum_steps,
                contextlib.nullcontext, self._not_boundary, self.device, self._backward, self.unique_texts,
            )
        grad_norm = self._grad_norm_before_step()
        self.ds.step()
        if grad_norm is None:
            grad_norm = self.ds.get_global_grad_norm()
        self._clamp_logit_scale()
        grad_norm_t = torch.as_tensor(float("nan") if grad_norm is None else float(grad_norm))
        return {"loss": mean_over_ranks(loss), "logit_scale": scale.reshape(()), "grad_norm": grad_norm_t, "lr": lr}

    def _grad_norm_before_step(self) -> float | None:
        # Without ZeRO the grads sit on the params (DeepSpeed reports no norm for a plain
        # torch optimizer); with ZeRO they are partitioned and DeepSpeed computes the norm.
        if self.zero_stage > 0 or self.bf16:
            return None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

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
        master = safe_get_full_fp32_param(p)  # collective under ZeRO; same value on all ranks
        current = master if master is not None else p.data
        if float(current.max()) <= limit:
            return
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
        path = Path(path_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist (create it first)")
        self.ds.save_checkpoint(str(path), tag=DS_TAG, save_latest=True)
        weights = self.consolidated_state_dict()
        if self.env.is_main:
            torch.save(weights, path / MODEL_FILE)
            torch.save(extra, path / EXTRA_FILE)
            meta = {"zero_stage": self.zero_stage, "world_size": self.env.world_size, "tag": DS_TAG,
                    "scalar_params": self.scalar_names, "bf16": self.bf16}
            (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, path_dir: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler from :meth:`save_checkpoint`; returns ``extra``."""
        path = Path(path_dir)
        missing = [n for n in (META_FILE, EXTRA_FILE, DS_TAG) if not (path / n).exists()]
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
                f"from its weights only, use model.pretrained={path / MODEL_FILE}"
            )
        loaded, _ = self.ds.load_checkpoint(
            str(path), tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / meta['tag']}")
        return torch.load(path / EXTRA_FILE, weights_only=False)


@register_engine("deepspeed")
def _build_deepspeed(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: DistEnv, device: torch.device
) -> DeepSpeedEngine:
    return DeepSpeedEngine(cfg, model, optimizer, scheduler, env, device)
