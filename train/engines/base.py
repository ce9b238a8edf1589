"""What every engine is: the protocol the trainer drives, the pieces it is built from, the registry.

:func:`build_engine` looks ``train.engine`` up in a registry. ``ddp`` lives in
:mod:`train.engines.ddp`; others (``deepspeed``) register themselves with
:func:`register_engine` when their package is imported, and :func:`build_engine` imports
``train.engines.<name>`` on demand, so nothing here imports deepspeed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from train.core import collectives
from train.core.collectives import Comm
from train.core.config import Config, DeepSpeedConfig, LossConfig, OptimConfig, TrainConfig
from train.core.configbase import ConfigError
from train.core.distenv import DistEnv
from train.objective.feature_cache import check_cacheable


@runtime_checkable
class Engine(Protocol):
    """What the trainer drives; see DESIGN.md ("Engines")."""

    model: nn.Module
    """The unwrapped open_clip model (plain state_dict keys)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any | None

    def step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One optimizer step on a ``Batch``; returns detached 0-dim metric tensors on the
        device, among them ``loss`` (mean over ranks) and ``finite`` (1.0, or 0.0 when the
        loss or the gradient was not finite and the update was skipped)."""
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


@dataclass
class EngineParts:
    """The typed pieces every engine is built from; the trainer assembles them once."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    loss_fn: nn.Module
    env: DistEnv
    device: torch.device
    comm: Comm
    train: TrainConfig
    """accum_steps, precision, unique_texts."""
    optim: OptimConfig
    """clip_grad_norm."""
    loss: LossConfig
    """logit_scale_max."""
    batch_size: int
    """Samples per rank per optimizer step (``data.batch_size``)."""
    run_dir: Path
    deepspeed: DeepSpeedConfig
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    """uint8 batch -> the towers' normalized input, on the device (``ForwardOptions.normalize``)."""

    @classmethod
    def from_config(cls, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None,
                    env: DistEnv, device: torch.device | str, comm: Comm | None = None) -> EngineParts:
        """Assemble the parts from a whole run config (the trainer, tests and benchmarks do).

        ``comm`` defaults to the process's (:func:`train.core.collectives.current`). uint8 batches
        are normalized with the model's own preprocessing mean and std (open_clip's config).
        """
        from train.data.augment import PixelNormalizer
        from train.model import pixel_stats
        from train.objective.loss import build_loss

        stats = pixel_stats(model)
        return cls(
            model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=build_loss(cfg.loss), env=env,
            device=torch.device(device), comm=comm or collectives.current(), train=cfg.train, optim=cfg.optim,
            loss=cfg.loss, batch_size=cfg.data.batch_size, run_dir=cfg.run.dir, deepspeed=cfg.deepspeed,
            normalize=PixelNormalizer(*stats) if stats is not None else None,
        )


def model_on(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` with every parameter and buffer on ``device`` (moved only if one is elsewhere).

    A model already there is returned untouched: ``Module.to`` would still swap each
    parameter for itself, which the CUDA rehearsal's fake parameters refuse
    (``tests/train/rehearsal``).
    """
    device = torch.device(device)

    def there(t: torch.Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    if all(there(t) for t in [*model.parameters(), *model.buffers()]):
        return model
    return model.to(device)


def check_parts(parts: EngineParts) -> None:
    """What every engine refuses: ``accum_steps < 1``, and accumulation over BatchNorm towers.

    Raises:
        ConfigError: naming the setting and the way out.
    """
    if parts.train.accum_steps < 1:
        raise ConfigError(f"train.accum_steps must be >= 1, got {parts.train.accum_steps}")
    if parts.train.accum_steps > 1:
        check_cacheable(parts.model)


_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


@contextlib.contextmanager
def keep_implementation_flags(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Load optimizer state without taking the saved run's implementation choices.

    ``Optimizer.load_state_dict`` restores every param-group option, also how the update is
    computed (fused/foreach kernels): a checkpoint written with another choice — e.g. before
    AdamW became fused by default — would silently switch this run's kernel and, with the
    on-device skip of non-finite steps, fail. Hyperparameters still come from the checkpoint.
    """
    flags = [{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    yield
    for group, saved in zip(optimizer.param_groups, flags):
        group.update(saved)


CPU_BF16_ENV = "ORBITCLIP_CPU_BF16"
"""Overrides what :func:`cpu_has_fast_bf16` detects: ``1`` = native bf16, ``0`` = not. The test
suite sets it so that no test depends on the CPU it meets, and runs the precision-sensitive
tests under both answers."""


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): measured 1.4x faster
    than fp32 on such a CPU, about 12x slower on an AVX2-only Zen 3.

    Raises:
        ConfigError: ``ORBITCLIP_CPU_BF16`` is set to something other than 0 or 1.
    """
    forced = _forced_cpu_bf16()
    if forced is not None:
        return forced
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if callable(c))


def _forced_cpu_bf16() -> bool | None:
    value = os.environ.get(CPU_BF16_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise ConfigError(f"{CPU_BF16_ENV} must be 0 or 1 (or unset to detect), got {value!r}")
    return value == "1"


def choose_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``(bf16|fp32, why)`` for the towers: ``auto`` is bf16 on CUDA and on CPUs with native
    bf16, fp32 elsewhere; ``fp32`` / ``bf16`` are taken as given. ``why`` is for the log."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision, f"train.precision={precision}"
    if device.type == "cuda":
        return "bf16", "auto on CUDA"
    if device.type != "cpu":
        return "fp32", f"auto on {device.type}"
    native = cpu_has_fast_bf16()
    forced = f" (forced by {CPU_BF16_ENV})" if _forced_cpu_bf16() is not None else ""
    if native:
        return "bf16", f"auto: this CPU has native bf16 (AVX-512 BF16 or AMX){forced}"
    return "fp32", f"auto: this CPU has no native bf16 (bf16 would be emulated, ~12x slower){forced}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for the towers (see :func:`choose_precision`)."""
    return choose_precision(precision, device)[0]


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The towers' precision context, decided once (see :func:`resolve_precision`)."""
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


EngineFactory = Callable[[EngineParts], Engine]
_ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Decorator: make :func:`build_engine` pick ``factory`` for ``train.engine == name``."""

    def deco(factory: EngineFactory) -> EngineFactory:
        _ENGINES[name] = factory
        return factory

    return deco


def build_engine(name: str, parts: EngineParts) -> Engine:
    """The engine registered as ``name`` (``ddp``, ``deepspeed``, or one that registered itself).

    Raises:
        RuntimeError: the engine is unknown or its module/dependency cannot be imported.
    """
    if name not in _ENGINES:
        try:
            importlib.import_module(f"train.engines.{name}")
        except ImportError as e:
            raise RuntimeError(
                f"train.engine={name!r} is not available: importing train.engines.{name} failed ({e}). "
                f"Available: {sorted(_ENGINES)}"
            ) from e
        if name not in _ENGINES:
            raise RuntimeError(f"train.engines.{name} did not register an engine named {name!r}")
    return _ENGINES[name](parts)
