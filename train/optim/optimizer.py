"""Optimizers: AdamW (CLIP's), Adam and Adafactor (CLIP-rsicd's), with a no-decay group.

Weight decay skips what :mod:`train.model.params` says (biases, norms, embeddings,
logit scale/bias). Frozen parameters (LiT locks) never reach the
optimizer, so they get no state and no update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.core.config import OptimConfig
from train.core.configbase import ConfigError
from train.model.params import no_decay_names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed and a non-decayed group (empty groups dropped).

    Raises:
        ValueError: when the model has no trainable parameter (everything locked).
    """
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # locked towers: no optimizer state, no update
        (no_decay if name in skip else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters (check model.lock_image / model.lock_text)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over the model's trainable parameters.

    ``adam`` applies ``weight_decay`` as classic L2 (coupled) to the decay group, as
    torch's Adam does; CLIP-rsicd's recipe uses it with weight_decay 0. ``adafactor``
    is torch's (relative-step free; ``lr`` is its step size, decay is decoupled).
    """
    groups = param_groups(model, cfg.weight_decay)
    common: dict[str, Any] = {"lr": cfg.lr}
    if cfg.foreach is not None:
        common["foreach"] = cfg.foreach
    if cfg.name in ("adamw", "adam"):
        # Fused by default: it is the fastest path and the only one that can skip a
        # non-finite step on the device (found_inf), without a host sync.
        common["fused"] = cfg.fused if cfg.fused is not None else cfg.foreach is not True
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(groups, betas=cfg.betas, eps=cfg.eps, **common)
    if cfg.name == "adafactor":
        if cfg.fused:
            raise ConfigError("optim.fused is not supported by torch.optim.Adafactor")
        return torch.optim.Adafactor(groups, **common)
    raise ConfigError(f"unknown optim.name {cfg.name!r} (adamw, adam, adafactor)")
