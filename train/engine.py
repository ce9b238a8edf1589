"""Engines: one whole optimizer step behind one interface, chosen once per run.

:func:`build_engine` looks ``cfg.train.engine`` up in a registry. The DDP engine
lives here; other engines (``train/engine_deepspeed.py``) register themselves with
:func:`register_engine` when imported, and :func:`build_engine` imports
``train.engine_<name>`` on demand, so nothing here imports deepspeed.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel

from train.config import Config
from train.distenv import DistEnv
from train.gather import mean_over_ranks
from train.gradcache import LossFn, cached_forward_backward, plain_forward_backward
from train.loss import build_loss, clamp_logit_scale_

MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, EXTRA_FILE = "model.pt", "optimizer.pt", "scheduler.pt", "extra.pt"


@runtime_checkable
class Engine(Protocol):
    """What the trainer drives; see DESIGN.md ("Step, loss, engines")."""

    model: nn.Module
    """The unwrapped open_clip model (plain state_dict keys)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any | None

    def step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One optimizer step on a ``Batch``; returns detached metric tensors."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and scheduler state."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        ...

    def save_checkpoint(self, path_dir: str | Path, extra: dict[str, Any]) -> None:
        """Write into an existing empty folder; every rank calls it."""
        ...

    def load_checkpoint(self, path_dir: str | Path) -> dict[str, Any]:
        """Restore from a folder written by :meth:`save_checkpoint`; returns ``extra``."""
        ...

    def full_model(self) -> ContextManager[nn.Module]:
        """The model with all weights present (ZeRO-3 gathers them). Every rank enters."""
        ...

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain open_clip state_dict on CPU, whatever the sharding. Every rank calls it."""
        ...


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The towers' precision context, decided once.

    ``auto`` is bf16 autocast on CUDA and fp32 elsewhere; ``bf16`` forces autocast.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class DDPEngine:
    """Data-parallel engine: DDP wrapper when ``world_size > 1``, bare model otherwise.

    A step runs the feature cache (:mod:`train.gradcache`) when ``accum_steps > 1``,
    syncs gradients once, clips, steps optimizer and scheduler, zeroes gradients and
    clamps the logit scale. Metrics stay on the device (no host sync).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        loss_fn: LossFn,
        env: DistEnv,
        device: torch.device,
        accum_steps: int = 1,
        precision: str = "auto",
        clip_grad_norm: float | None = None,
        logit_scale_max: float = 100.0,
        unique_texts: bool = False,
    ) -> None:
        if accum_steps < 1:
            raise ValueError(f"train.accum_steps must be >= 1, got {accum_steps}")
        self.model = model.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.env = env
        self.device = torch.device(device)
        self.accum_steps = accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.logit_scale_max = logit_scale_max
        self.unique_texts = unique_texts
        self.autocast = autocast_factory(precision, self.device)
        self.module: nn.Module = self.model
        self.no_sync: Callable[[], ContextManager] = contextlib.nullcontext
        if env.world_size > 1:
            if not dist.is_initialized() or dist.get_world_size() != env.world_size:
                raise RuntimeError(
                    f"DDPEngine needs an initialized process group of {env.world_size} ranks "
                    f"(got {'none' if not dist.is_initialized() else dist.get_world_size()})"
                )
            ids = None
            if self.device.type == "cuda":
                ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            self.module = DistributedDataParallel(self.model, device_ids=ids)
            self.no_sync = self.module.no_sync

    def step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward/backward (feature cache if accumulating), sync, clip, update.

        Returns:
            ``loss`` (mean over ranks = the full-batch loss), ``logit_scale`` (used in this
            step), ``grad_norm`` (before clipping), ``lr`` (used in this step).
        """
        # torch.full launches a fill with the value as argument: no host-device copy/sync.
        lr = torch.full((), float(self.optimizer.param_groups[0]["lr"]), device=self.device)
        if self.accum_steps == 1:
            images = batch.images.to(self.device, non_blocking=True)
            texts = batch.texts.to(self.device, non_blocking=True)
            loss, scale = plain_forward_backward(
                self.module, self.loss_fn, images, texts, self.autocast, unique_texts=self.unique_texts
            )
        else:  # the cache moves one micro-batch at a time to the device
            loss, scale = cached_forward_backward(
                self.module, self.model, self.loss_fn, batch.images, batch.texts,
                self.accum_steps, self.autocast, self.no_sync, self.device, unique_texts=self.unique_texts,
            )
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            grad_norm = torch.zeros((), device=self.device)
        elif self.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale_(self.model, self.logit_scale_max)
        return {"loss": mean_over_ranks(loss), "logit_scale": scale, "grad_norm": grad_norm.detach(), "lr": lr}

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

        The folder must exist; atomic publication (temp folder, rename, ``latest``) is
        the trainer's job. Every rank must call this (it ends with a barrier).
        """
        path = Path(path_dir)
        if self.env.is_main:
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint folder {path} does not exist (create it first)")
            state = self.state_dict()
            torch.save(state["model"], path / MODEL_FILE)
            torch.save(state["optimizer"], path / OPTIMIZER_FILE)
            if state["scheduler"] is not None:
                torch.save(state["scheduler"], path / SCHEDULER_FILE)
            torch.save(extra, path / EXTRA_FILE)
        if self.env.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, path_dir: str | Path) -> dict[str, Any]:
        """Every rank loads the folder written by :meth:`save_checkpoint`; returns ``extra``."""
        path = Path(path_dir)
        missing = [n for n in (MODEL_FILE, OPTIMIZER_FILE, EXTRA_FILE) if not (path / n).is_file()]
        if self.scheduler is not None and not (path / SCHEDULER_FILE).is_file():
            missing.append(SCHEDULER_FILE)
        if missing:
            raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
        # Optimizer/scheduler/extra are our own files and may hold any picklable trainer
        # state (e.g. data-loader positions), hence weights_only=False for them.
        state = {
            "model": torch.load(path / MODEL_FILE, map_location=self.device, weights_only=True),
            "optimizer": torch.load(path / OPTIMIZER_FILE, map_location=self.device, weights_only=False),
            "scheduler": (
                torch.load(path / SCHEDULER_FILE, weights_only=False) if self.scheduler is not None else None
            ),
        }
        self.load_state_dict(state)
        return torch.load(path / EXTRA_FILE, weights_only=False)


EngineFactory = Callable[[Config, nn.Module, torch.optim.Optimizer, Any, DistEnv, torch.device], Engine]
_ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Decorator: make ``build_engine`` pick ``factory`` when ``cfg.train.engine == name``."""

    def deco(factory: EngineFactory) -> EngineFactory:
        _ENGINES[name] = factory
        return factory

    return deco


@register_engine("ddp")
def _build_ddp(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: DistEnv, device: torch.device
) -> DDPEngine:
    return DDPEngine(
        model, optimizer, scheduler, build_loss(cfg.loss), env, device,
        accum_steps=cfg.train.accum_steps, precision=cfg.train.precision,
        clip_grad_norm=cfg.optim.clip_grad_norm, logit_scale_max=cfg.loss.logit_scale_max,
        unique_texts=cfg.train.unique_texts,
    )


def build_engine(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    env: DistEnv,
    device: torch.device,
) -> Engine:
    """The engine named by ``cfg.train.engine`` (``ddp``, or one that registered itself).

    Raises:
        RuntimeError: the engine is unknown or its module/dependency cannot be imported.
    """
    name = cfg.train.engine
    if name not in _ENGINES:
        try:
            importlib.import_module(f"train.engine_{name}")
        except ImportError as e:
            raise RuntimeError(
                f"train.engine={name!r} is not available: importing train.engine_{name} failed ({e}). "
                f"Available: {sorted(_ENGINES)}"
            ) from e
        if name not in _ENGINES:
            raise RuntimeError(f"train.engine_{name} did not register an engine named {name!r}")
    return _ENGINES[name](cfg, model, optimizer, scheduler, env, torch.device(device))
