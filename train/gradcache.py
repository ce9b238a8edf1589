"""One forward/backward of a rank's batch, optionally through a micro-batch feature cache.

With ``accum_steps == 1`` it is a plain forward + loss + backward. Otherwise
(GradCache, Gao et al. 2021) the contrastive loss still sees the *whole* local batch:

1. each micro-batch is encoded without grad, after recording the RNG state;
2. the loss runs on the concatenated cached features (gathered across ranks inside the
   loss) and gives ``dL/dfeatures`` and ``dL/d(scale, bias)``;
3. each micro-batch is encoded again *with* grad under its recorded RNG state, so
   dropout / patch dropout draw the same masks as in step 1, and
   ``backward(features, cached_grad_slice)`` accumulates the parameter gradients.

DDP must sync gradients once per step: all but the last re-forward run inside
``no_sync()``. The scale/bias gradient is fed through the last re-forward's outputs
(open_clip's forward returns ``logit_scale.exp()`` and ``logit_bias``), so it reaches
DDP's reducer like any other gradient. The result is the exact full-batch gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn


@dataclass
class Features:
    """What one CLIP forward returns: embeddings plus the temperature terms."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    """``logit_scale.exp()``."""
    bias: torch.Tensor | None


def encode(module: nn.Module, images: torch.Tensor, texts: torch.Tensor, unique_texts: bool = False) -> Features:
    """Run an open_clip CLIP (or a DDP wrapper of one) on a batch.

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


@dataclass
class RngState:
    """Generator states that dropout / patch dropout draw from on ``device``."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None


def capture_rng(device: torch.device) -> RngState:
    """Record the CPU generator and, on CUDA, the device's generator."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), cuda)


def restore_rng(state: RngState, device: torch.device) -> None:
    """Put the generators back to a recorded state."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, device)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _loss_fp32(loss_fn: LossFn, f: Features) -> torch.Tensor:
    # The loss runs outside autocast in fp32: logits of a large batch in bf16 lose
    # the small differences the softmax cares about, and it costs little.
    bias = f.bias.float() if f.bias is not None else None
    return loss_fn(f.image.float(), f.text.float(), f.scale.float(), bias)


BackwardFn = Callable[[list[torch.Tensor], list[torch.Tensor]], None]
"""``backward(tensors, cotangents)``: accumulate ``J^T g`` into the parameters' grads."""


def autograd_backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The default :data:`BackwardFn` (DDP and single process): plain autograd."""
    torch.autograd.backward(tensors, grads)


def _backward_pairs(
    tensors: list[torch.Tensor | None], grads: list[torch.Tensor | None], backward: BackwardFn = autograd_backward
) -> None:
    # Frozen towers (LiT) produce outputs without grad: leave them out.
    pairs = [(t, g) for t, g in zip(tensors, grads) if t is not None and g is not None and t.requires_grad]
    if pairs:
        backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])


def plain_forward_backward(
    module: nn.Module,
    loss_fn: LossFn,
    images: torch.Tensor,
    texts: torch.Tensor,
    autocast: Callable[[], ContextManager],
    backward: BackwardFn = autograd_backward,
    unique_texts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the whole local batch through ``module`` and back-propagate the loss.

    ``backward`` replaces autograd where an engine must see every backward (DeepSpeed);
    ``unique_texts`` as in :func:`encode`.

    Returns:
        (local loss ``L_r``, logit scale), both detached.
    """
    with autocast():
        f = encode(module, images, texts, unique_texts)
    loss = _loss_fp32(loss_fn, f)
    if loss.requires_grad:
        backward([loss], [torch.ones_like(loss)])
    return loss.detach(), f.scale.detach().float()


def cached_forward_backward(
    module: nn.Module,
    raw_model: nn.Module,
    loss_fn: LossFn,
    images: torch.Tensor,
    texts: torch.Tensor,
    accum_steps: int,
    autocast: Callable[[], ContextManager],
    no_sync: Callable[[], ContextManager],
    device: torch.device,
    backward: BackwardFn = autograd_backward,
    unique_texts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact full-batch gradient computed ``accum_steps`` micro-batches at a time.

    Args:
        module: what to run with grad (the DDP wrapper, or the model on 1 process).
        raw_model: the unwrapped model, used for the no-grad caching pass.
        loss_fn: local-rows loss (gathers across ranks itself).
        images, texts: this rank's batch; its size must be divisible by ``accum_steps``.
        accum_steps: number of micro-batches.
        autocast: returns the precision context for the towers.
        no_sync: returns DDP's ``no_sync()`` context (``nullcontext`` without DDP).
        device: where the towers run (to record the right RNG).
        backward: how each re-forward's cotangents are back-propagated (default autograd).
        unique_texts: encode each distinct caption of a micro-batch once (see :func:`encode`).

    Returns:
        (local loss ``L_r``, logit scale), both detached.
    """
    n = images.shape[0]
    if n % accum_steps or texts.shape[0] != n:
        raise ValueError(
            f"local batch of {n} images / {texts.shape[0]} texts cannot be cut into {accum_steps} equal micro-batches"
        )
    # The batch may still be on the host: each micro-batch goes to the device only while
    # it is encoded (twice), so device memory holds one micro-batch of inputs, not the
    # whole cached batch (65k x 224 px of float32 alone is 37 GiB).
    image_chunks, text_chunks = images.chunk(accum_steps), texts.chunk(accum_steps)

    states, cached = [], []
    with torch.no_grad():
        for im, tx in zip(image_chunks, text_chunks):
            states.append(capture_rng(device))
            with autocast():
                cached.append(encode(
                    raw_model, im.to(device, non_blocking=True), tx.to(device, non_blocking=True), unique_texts
                ))
    after = capture_rng(device)

    # Leaves that stand in for the towers' outputs: the loss graph ends here.
    img = torch.cat([f.image for f in cached]).float().requires_grad_()
    txt = torch.cat([f.text for f in cached]).float().requires_grad_()
    scale = cached[0].scale.detach().float().requires_grad_()
    bias = cached[0].bias.detach().float().requires_grad_() if cached[0].bias is not None else None
    loss = loss_fn(img, txt, scale, bias)
    inputs = [img, txt, scale] + ([bias] if bias is not None else [])
    grads = list(torch.autograd.grad(loss, inputs)) + ([None] if bias is None else [])
    g_img, g_txt, g_scale, g_bias = grads
    del cached, img, txt

    micro = n // accum_steps
    for i, (im, tx) in enumerate(zip(image_chunks, text_chunks)):
        last = i == accum_steps - 1
        restore_rng(states[i], device)
        with no_sync() if not last else contextlib.nullcontext():
            with autocast():
                f = encode(module, im.to(device, non_blocking=True), tx.to(device, non_blocking=True), unique_texts)
            rows = slice(i * micro, (i + 1) * micro)
            tensors = [f.image, f.text] + ([f.scale, f.bias] if last else [])
            cotangents = [g_img[rows], g_txt[rows]] + ([g_scale, g_bias] if last else [])
            _backward_pairs(tensors, cotangents, backward)
    # Continue the RNG stream as if each micro-batch had been drawn once.
    restore_rng(after, device)
    return loss.detach(), scale.detach()
