"""Learning-rate schedules as pure functions of the optimizer step.

``lr_at(step, cfg, total_steps)`` is the learning rate used by optimizer step
``step`` (0-based). :func:`build_scheduler` wraps it in a ``LambdaLR`` so the
schedule's position is saved and restored with the engine's state.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from train.core.config import OptimConfig
from train.core.configbase import ConfigError


def warmup_steps_for(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length: the larger of ``warmup_steps`` and ``warmup_fraction * total_steps``."""
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.warmup_fraction <= 1.0:
        raise ConfigError(
            f"optim.warmup_steps must be >= 0 and optim.warmup_fraction in [0, 1], got "
            f"{cfg.warmup_steps} and {cfg.warmup_fraction}"
        )
    return max(cfg.warmup_steps, math.ceil(cfg.warmup_fraction * total_steps))


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``.

    Linear warmup from ``lr / warmup`` to ``lr`` over the warmup steps, then
    cosine, linear or no decay that would reach ``min_lr`` at step ``total_steps``
    (one past the last), so every step of the run trains. Steps from ``total_steps``
    on stay at ``min_lr`` (``lr`` for constant).

    Raises:
        ValueError: on a negative step, a non-positive total or an lr below min_lr.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr and lr > 0, got lr={cfg.lr} min_lr={cfg.min_lr}")
    warmup = warmup_steps_for(cfg, total_steps)
    if step < warmup:
        # (step + 1) so the first step already trains; the last warmup step reaches lr.
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    # As open_clip: decay over [warmup, total) so the last step still trains (lr > min_lr)
    # and min_lr is reached at step == total_steps.
    decay_steps = total_steps - warmup
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup) / decay_steps)
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    raise ConfigError(f"unknown optim.schedule {cfg.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_at`; stepped once per optimizer step by the engine.

    Every param group must start at ``cfg.lr`` (the factor is relative to it).
    """
    lr_at(0, cfg, total_steps)  # validate the config now, not inside the first step
    for group in optimizer.param_groups:
        if not math.isclose(group["lr"], cfg.lr):
            raise ValueError(f"param group lr {group['lr']} != optim.lr {cfg.lr}; the schedule is relative to optim.lr")
    return LambdaLR(optimizer, lambda step: lr_at(step, cfg, total_steps) / cfg.lr)
