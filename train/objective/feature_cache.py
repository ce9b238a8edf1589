"""The micro-batch feature cache (GradCache, Gao et al. 2021): exact accumulation.

The contrastive loss must see the *whole* local batch, so accumulating micro-batch losses
would change it. Instead:

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

import torch
from torch import nn

from train.core.configbase import ConfigError
from train.core.phases import phase
from train.core.rng import capture_device, restore_device
from train.objective.forward import ForwardOptions, LossFn, backward_pairs, encode


def check_cacheable(model: nn.Module) -> None:
    """Refuse models whose forward depends on how the batch is cut: BatchNorm in training mode.

    Each micro-batch would normalize with its own statistics (not the full batch's) and the
    running statistics would be updated twice per micro-batch (cache and re-forward).

    Raises:
        ConfigError: naming the first such layer and the ways out.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ConfigError(
                f"train.accum_steps > 1 with BatchNorm in training mode ({name}): micro-batches would "
                "use their own batch statistics, not the full batch's, and update the running statistics "
                "twice; use train.accum_steps=1, or freeze the tower's BatchNorm (model.lock_image=true "
                "with model.lock_image_freeze_bn_stats=true)"
            )


def cached_forward_backward(
    module: nn.Module, loss_fn: LossFn, images: torch.Tensor, texts: torch.Tensor, opts: ForwardOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact full-batch gradient computed ``opts.accum_steps`` micro-batches at a time.

    The batch may stay on the host: each micro-batch goes to the device only while it is
    encoded (twice), so device memory holds one micro-batch of inputs, not the whole cached
    batch (65k x 224 px of float32 alone is 37 GiB).

    Returns:
        (local loss ``L_r``, logit scale), both detached.
    """
    n, k, device = images.shape[0], opts.accum_steps, opts.device
    if n % k or texts.shape[0] != n:
        raise ValueError(f"local batch of {n} images / {texts.shape[0]} texts cannot be cut into {k} equal micro-batches")
    chunks = list(zip(images.chunk(k), texts.chunk(k)))
    cache_module = opts.cache_module if opts.cache_module is not None else module

    states, cached = [], []
    with phase("forward"), torch.no_grad():
        for im, tx in chunks:
            states.append(capture_device(device))
            with opts.autocast():
                cached.append(encode(cache_module, *opts.to_device(im, tx), opts.unique_texts))
    after = capture_device(device)

    # Leaves that stand in for the towers' outputs: the loss graph ends here.
    with phase("loss"):
        img = torch.cat([f.image for f in cached]).float().requires_grad_()
        txt = torch.cat([f.text for f in cached]).float().requires_grad_()
        scale = cached[0].scale.detach().float().requires_grad_()
        bias = cached[0].bias.detach().float().requires_grad_() if cached[0].bias is not None else None
        loss = loss_fn(img, txt, scale, bias)
        inputs = [img, txt, scale] + ([bias] if bias is not None else [])
        grads = list(torch.autograd.grad(loss, inputs)) + ([None] if bias is None else [])
    g_img, g_txt, g_scale, g_bias = grads
    del cached, img, txt

    micro = n // k
    # The re-forwards with grad count as backward: they exist only to back-propagate.
    with phase("backward"):
        _reforward_backward(module, chunks, states, micro, (g_img, g_txt, g_scale, g_bias), opts)
    # Continue the RNG stream as if each micro-batch had been drawn once.
    restore_device(after, device)
    return loss.detach(), scale.detach()


def _reforward_backward(module: nn.Module, chunks: list, states: list, micro: int, grads: tuple,
                        opts: ForwardOptions) -> None:
    """Second pass: each micro-batch again, with grad, under its recorded RNG state, fed
    its slice of the cached feature gradients (the scale/bias terms once, with the last)."""
    g_img, g_txt, g_scale, g_bias = grads
    device, k = opts.device, len(chunks)
    for i, (im, tx) in enumerate(chunks):
        last = i == k - 1
        restore_device(states[i], device)
        with opts.no_sync() if not last else contextlib.nullcontext():
            with opts.autocast():
                f = encode(module, *opts.to_device(im, tx), opts.unique_texts)
            rows = slice(i * micro, (i + 1) * micro)
            tensors = [f.image, f.text] + ([f.scale, f.bias] if last else [])
            cotangents = [g_img[rows], g_txt[rows]] + ([g_scale, g_bias] if last else [])
            backward_pairs(tensors, cotangents, opts.backward)
