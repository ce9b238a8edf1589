"""One forward/backward of a rank's batch: the encoders' outputs, the options, the plain path
(a forward + loss + backward of the whole local batch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from train.core.phases import phase


@dataclass
class Features:
    """What one CLIP forward returns: embeddings plus the temperature terms."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    """``logit_scale.exp()``."""
    bias: torch.Tensor | None


def encode(module: nn.Module, images: torch.Tensor, texts: torch.Tensor, unique_texts: bool = False) -> Features:
    """Run an open_clip CLIP (or a DDP/DeepSpeed wrapper of one) on a batch.

    Accepts both of open_clip's output forms (tuple, or dict with ``output_dict=True``).
    With ``unique_texts`` each distinct token row is encoded once and its embedding
    indexed back into place: the same loss and gradients (indexing's backward sums the
    copies), but with template captions (10 classes x 3 templates) the text tower
    costs almost nothing. ``torch.unique`` syncs with the host, so it is opt-in.
    """
    if unique_texts:
        distinct, inverse = torch.unique(texts, dim=0, return_inverse=True)
        f = encode(module, images, distinct)
        return Features(f.image, f.text[inverse], f.scale, f.bias)
    out = module(images, texts)
    if isinstance(out, dict):
        return Features(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
    if len(out) == 4:
        return Features(*out)
    image, text, scale = out
    return Features(image, text, scale, None)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
BackwardFn = Callable[[list[torch.Tensor], list[torch.Tensor]], None]
"""``backward(tensors, cotangents)``: accumulate ``J^T g`` into the parameters' grads."""


def autograd_backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The default :data:`BackwardFn` (DDP and single process): plain autograd."""
    torch.autograd.backward(tensors, grads)


@dataclass(frozen=True)
class ForwardOptions:
    """How an engine forwards and back-propagates a rank's batch; fixed for a run."""

    device: torch.device
    """Where the towers run; inputs are moved there (one micro-batch at a time when caching)."""
    accum_steps: int = 1
    """Micro-batches per local batch; > 1 runs the feature cache."""
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    """The towers' precision context."""
    backward: BackwardFn = autograd_backward
    """How cotangents are back-propagated (DeepSpeed must see every backward)."""
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext
    """Wraps every re-forward but the last (DDP ``no_sync``, DeepSpeed's non-boundary mark)."""
    cache_module: nn.Module | None = None
    """Module for the feature cache's no-grad pass (the unwrapped model under DDP); None = the same."""
    input_dtype: torch.dtype | None = None
    """Cast images to this dtype on the device (DeepSpeed bf16 has no autocast)."""
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Turns uint8 pixels into the towers' normalized float input, on the device (the loaders'
    batches are uint8; see ``train.data.augment.PixelNormalizer``); float inputs pass through it."""
    unique_texts: bool = False
    """Encode each distinct caption once (see :func:`encode`)."""

    def to_device(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs on :attr:`device`, images normalized there (pinned host tensors copy asynchronously).

        Raises:
            ValueError: uint8 images without :attr:`normalize`.
        """
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError("uint8 images need ForwardOptions.normalize (the model's mean and std)")
            images = self.normalize(images)
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        return images, texts.to(self.device, non_blocking=True)


def loss_fp32(loss_fn: LossFn, f: Features) -> torch.Tensor:
    """The loss outside autocast in fp32: logits of a large batch in bf16 lose the small
    differences the softmax cares about, and it costs little."""
    bias = f.bias.float() if f.bias is not None else None
    return loss_fn(f.image.float(), f.text.float(), f.scale.float(), bias)


def backward_pairs(tensors: list[torch.Tensor | None], grads: list[torch.Tensor | None], backward: BackwardFn) -> None:
    """Back-propagate ``grads`` into ``tensors``, leaving out outputs without grad (frozen towers, LiT)."""
    pairs = [(t, g) for t, g in zip(tensors, grads) if t is not None and g is not None and t.requires_grad]
    if pairs:
        backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])


def plain_forward_backward(
    module: nn.Module, loss_fn: LossFn, images: torch.Tensor, texts: torch.Tensor, opts: ForwardOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the whole local batch through ``module`` and back-propagate the loss.

    Returns:
        (local loss ``L_r``, logit scale), both detached.
    """
    with phase("forward"):
        images, texts = opts.to_device(images, texts)
        with opts.autocast():
            f = encode(module, images, texts, opts.unique_texts)
    with phase("loss"):
        loss = loss_fp32(loss_fn, f)
    with phase("backward"):
        if loss.requires_grad:
            opts.backward([loss], [torch.ones_like(loss)])
    return loss.detach(), f.scale.detach().float()
