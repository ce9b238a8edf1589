"""Optimizers: AdamW (CLIP's), Adam and Adafactor (CLIP-rsicd's), with a no-decay group.

Weight decay is not applied to biases, norm layers, embeddings (positional,
class, token) or the logit scale/bias: decaying those hurts contrastive training
(open_clip and CLIP do the same). Frozen parameters (LiT locks) never reach the
optimizer, so they get no state and no update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.config import OptimConfig


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """The no-decay rule: 0/1-dim tensors, biases, norms, embeddings, logit scale/bias."""
    if param.ndim < 2 or name.endswith(".bias") or "embedding" in name or "logit_" in name:
        return True
    # Norm layers: open_clip names them ln_1, ln_pre, ln_final, norm, ...; match whole name parts
    # so that e.g. "in_proj_weight" is not taken for a norm.
    return any(part.startswith(("ln", "norm", "bn")) for part in name.split("."))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that must not be weight-decayed.

    Uses ``train.model.no_decay_parameter_names`` when that helper exists, so the
    model owner decides for exotic towers; otherwise the rule in this module.
    """
    try:
        from train.model import no_decay_parameter_names  # type: ignore[attr-defined]
    except ImportError:
        return {n for n, p in model.named_parameters() if is_no_decay(n, p)}
    return set(no_decay_parameter_names(model))


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
        raise ValueError("the model has no trainable parameters (check model.lock_image / model.lock_text)")
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
        if cfg.fused is not None:
            common["fused"] = cfg.fused
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(groups, betas=cfg.betas, eps=cfg.eps, **common)
    if cfg.name == "adafactor":
        if cfg.fused:
            raise ValueError("optim.fused is not supported by torch.optim.Adafactor")
        return torch.optim.Adafactor(groups, **common)
    raise ValueError(f"unknown optim.name {cfg.name!r} (adamw, adam, adafactor)")
