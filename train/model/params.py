"""Which parameters weight decay skips: the one rule, used by the optimizer.

Biases, norm layers, embeddings (token, positional, class) and the logit scale/bias are
not decayed (CLIP and open_clip do the same; decaying them hurts contrastive training).
Embedding tables and tokens are lookups, not linear maps, whatever their rank; a norm
weight stays exempt even if an exotic tower stores it 2-D.
"""

from __future__ import annotations

import torch
from torch import nn

# open_clip: *_embedding, text cls_emb; timm towers: pos_embed, cls_token.
_NAME_PARTS = ("embedding", "pos_embed", "cls_token", "cls_emb", "logit_scale", "logit_bias")
# Norm layers: open_clip names them ln_1, ln_pre, ln_final, norm, ...; whole dotted parts are
# matched so that e.g. "in_proj_weight" is not taken for a norm.
_NORM_PREFIXES = ("ln", "norm", "bn")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether parameter ``name`` must not be weight-decayed."""
    if param.ndim < 2 or name.endswith(".bias") or any(part in name for part in _NAME_PARTS):
        return True
    return any(part.startswith(_NORM_PREFIXES) for part in name.split("."))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that weight decay skips.

    The rule of :func:`is_no_decay`, plus the model's own ``no_weight_decay()`` list where
    the tower provides one (timm towers do).
    """
    names = {n for n, p in model.named_parameters() if is_no_decay(n, p)}
    own = getattr(model, "no_weight_decay", None)
    if callable(own):
        params = dict(model.named_parameters())
        names |= {n for n in own() if n in params}
    return names
