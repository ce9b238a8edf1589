"""The contrastive objective: losses on features gathered across ranks with gradient
(:mod:`.loss`, :mod:`.gather`), one forward/backward of a rank's batch (:mod:`.forward`) and
the micro-batch feature cache that makes accumulation exact (:mod:`.feature_cache`).

:func:`forward_backward` is what engines call.
"""

from __future__ import annotations

import torch
from torch import nn

from train.objective.feature_cache import cached_forward_backward
from train.objective.forward import ForwardOptions, LossFn, plain_forward_backward


def forward_backward(
    module: nn.Module, loss_fn: LossFn, images: torch.Tensor, texts: torch.Tensor, opts: ForwardOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact full-batch gradient of this rank's batch, plain or through the feature cache.

    Args:
        module: what runs with grad (the DDP/DeepSpeed wrapper, or the model on 1 process).
        loss_fn: local-rows loss (gathers across ranks itself).
        images, texts: this rank's batch, on the host or the device.
        opts: see :class:`~train.objective.forward.ForwardOptions`; ``accum_steps > 1``
            runs the feature cache.

    Returns:
        (local loss ``L_r``, logit scale), both detached, on the device.
    """
    if opts.accum_steps == 1:
        return plain_forward_backward(module, loss_fn, images, texts, opts)
    return cached_forward_backward(module, loss_fn, images, texts, opts)


__all__ = ["ForwardOptions", "forward_backward"]
