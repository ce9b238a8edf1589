"""Image transforms: overhead-imagery augmentation for training, a plain one for eval.

Overhead images have no canonical "up" or handedness, so flips and 90-degree
rotations are label-preserving (unlike for web photos).

The training transform is built for the loader's hot path (see benchmarks/README.md):
all random choices of a sample are drawn up front from its own seed
(:meth:`TrainTransform.plan`, a pure function of the seed and the image size, so exact
resume and worker-count independence hold without touching torch's global RNG); the
plan is known before decoding, so a JPEG can be decoded at a reduced DCT scale when the
crop is much larger than the output (:meth:`TrainTransform.decode_size`); the crop is
resized once, on uint8, in the channels-last layout torch's fast uint8 kernels want;
flips/rot90 are uint8 tensor ops. Training batches stay uint8 (a quarter of float32's
host memory and host-to-device traffic): :class:`PixelNormalizer` converts and normalizes
them on the compute device with the same operations as :func:`normalize_pixels`, so the
towers see bitwise the values host normalization would give.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

import train.core.compat

train.core.compat.ensure_torchvision()

from torchvision.transforms import InterpolationMode, v2  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from train.core.config import AugmentConfig  # noqa: E402

Transform = Callable[[object], torch.Tensor]
"""PIL image -> normalized float32 tensor [3, H, W]."""

_BICUBIC = InterpolationMode.BICUBIC
_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def build_eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """Resize the shorter side to ``image_size``, center-crop, scale to [0, 1], normalize.

    Args:
        image_size: Output height and width.
        mean: Per-channel normalization mean.
        std: Per-channel normalization std.
    """
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(image_size, interpolation=_BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def normalize_pixels(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels (``[3, H, W]`` or ``[N, 3, H, W]``) -> float32 in [0, 1], normalized.

    The one definition of the arithmetic (same values and ops as ``v2.ToDtype(scale=True)`` +
    ``v2.Normalize``): elementwise, so the result does not depend on the batch's shape or the
    device's vector width. ``mean``/``std`` are ``[3, 1, 1]`` float32 on the image's device.
    """
    out = image.to(torch.float32) if out is None else out.copy_(image)
    out.mul_(1.0 / 255)
    out.sub_(mean)
    return out.div_(std)


class PixelNormalizer:
    """Normalizes uint8 batches where they are (the compute device); float batches pass as they are.

    Engines run it on every (micro-)batch after the host-to-device copy, so the host never holds
    a float32 batch.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if images.device not in self._on:  # small constants, copied to a device once
            self._on[images.device] = tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(images.device)
                                            for v in (self.mean, self.std))
        return normalize_pixels(images, *self._on[images.device])


@dataclass(frozen=True)
class AugmentPlan:
    """Every random choice for one sample, fixed before the image is decoded."""

    source: tuple[int, int]
    """(width, height) of the full-resolution image the plan was drawn for."""
    crop: tuple[int, int, int, int] | None
    """(top, left, height, width) in source pixels; None = resize shorter side + center crop."""
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    jitter: tuple[tuple[int, float], ...] = ()
    """(op index into brightness/contrast/saturation/hue, factor), in application order."""


def _crop_params(rng: random.Random, width: int, height: int, scale: Sequence[float],
                 ratio: Sequence[float]) -> tuple[int, int, int, int]:
    # torchvision's RandomResizedCrop.get_params, drawn from a private RNG instead of
    # torch's global one (forking torch's RNG per sample cost more than the crop).
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Seeded training augmentation: PIL image -> uint8 ``[3, S, S]`` (:meth:`pixels`), or
    normalized float32 (:meth:`seeded`, calling the object).

    With ``aug=None`` (augmentation disabled) the normalized output equals
    :func:`build_eval_transform`'s. Calling the object draws the seed from torch's
    global RNG; :meth:`seeded`, :meth:`pixels` and the loader's batch path do not touch it.
    """

    def __init__(self, aug: AugmentConfig | None, image_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.aug = aug if aug is not None and aug.enabled else None
        self.image_size = int(image_size)
        # Same values and ops as v2.ToDtype(scale=True) + v2.Normalize: bitwise-equal results.
        self._mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def plan(self, size: tuple[int, int], seed: int) -> AugmentPlan:
        """All random choices for an image of ``size`` = (width, height), from ``seed``."""
        a = self.aug
        if a is None:
            return AugmentPlan(tuple(size), None)
        rng = random.Random(seed)
        crop = _crop_params(rng, size[0], size[1], a.crop_scale, a.crop_ratio) if a.random_resized_crop else None
        hflip = a.hflip and rng.random() < 0.5
        vflip = a.vflip and rng.random() < 0.5
        rot90 = rng.randrange(4) if a.rot90 else 0
        jitter: list[tuple[int, float]] = []
        if a.color_jitter > 0 or a.hue_jitter > 0:
            cj, hj = a.color_jitter, a.hue_jitter
            ranges = [(max(0.0, 1 - cj), 1 + cj) if cj > 0 else None] * 3 + [(-hj, hj) if hj > 0 else None]
            for op in rng.sample(range(4), 4):  # random order, as v2.ColorJitter
                if ranges[op] is not None:
                    jitter.append((op, rng.uniform(*ranges[op])))
        return AugmentPlan(tuple(size), crop, hflip, vflip, rot90, tuple(jitter))

    def decode_size(self, plan: AugmentPlan) -> tuple[int, int] | None:
        """Smallest (width, height) to decode at so the planned region still has >= S pixels
        per side (for PIL's JPEG ``draft``); None when no 2x reduction is possible."""
        w, h = plan.source
        region = (plan.crop[3], plan.crop[2]) if plan.crop else (min(w, h), min(w, h))
        factor = self.image_size / min(region)
        if factor > 0.5:
            return None
        return math.ceil(w * factor), math.ceil(h * factor)

    def augment(self, image, plan: AugmentPlan) -> torch.Tensor:
        """Apply ``plan`` to a decoded PIL image (full size or a reduced JPEG draft): uint8 [3, S, S]."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        s = self.image_size
        if plan.crop is None:
            x = TF.center_crop(TF.resize(TF.pil_to_tensor(image), s, _BICUBIC, antialias=True), s)
        else:
            top, left, h, w = plan.crop
            if image.size != plan.source:  # decoded at a reduced scale: map the box onto it
                sx, sy = image.size[0] / plan.source[0], image.size[1] / plan.source[1]
                top, left = int(top * sy), int(left * sx)
                h = max(1, min(image.size[1] - top, round(h * sy)))
                w = max(1, min(image.size[0] - left, round(w * sx)))
            # HWC memory seen as CHW (channels-last): torch's fast uint8 resize path.
            hwc = torch.from_numpy(np.array(image))
            x = TF.resized_crop(hwc.permute(2, 0, 1), top, left, h, w, [s, s], _BICUBIC, antialias=True)
        if plan.hflip:
            x = x.flip(-1)
        if plan.vflip:
            x = x.flip(-2)
        if plan.rot90:
            x = torch.rot90(x, plan.rot90, dims=(-2, -1))
        for op, factor in plan.jitter:
            x = _JITTER_OPS[op](x, factor)
        return x

    def normalize_into(self, image: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Scale a uint8 image to [0, 1] and normalize it, written into ``out`` (float32)."""
        return normalize_pixels(image, self._mean, self._std, out)

    def pixels(self, image, seed: int) -> torch.Tensor:
        """The augmented uint8 image for ``seed`` (a pure function of both): what batches carry."""
        return self.augment(image, self.plan(image.size, seed))

    def seeded(self, image, seed: int) -> torch.Tensor:
        """The augmented, normalized image for ``seed`` (a pure function of both)."""
        x = self.pixels(image, seed)
        return self.normalize_into(x, torch.empty(x.shape, dtype=torch.float32))

    def __call__(self, image) -> torch.Tensor:
        return self.seeded(image, int(torch.randint(0, 2**62, (1,))))


def build_train_transform(
    aug: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> TrainTransform:
    """Training transform from ``cfg.data.augment`` (the eval transform's output when disabled).

    Args:
        aug: Which augmentations to apply and how strongly.
        image_size: Output height and width.
        mean: Per-channel normalization mean.
        std: Per-channel normalization std.
    """
    return TrainTransform(aug, image_size, mean, std)


def apply_seeded(transform: Transform, image: object, seed: int) -> torch.Tensor:
    """Run ``transform`` with its randomness drawn from ``seed``, leaving the global RNG untouched."""
    if isinstance(transform, TrainTransform):
        return transform.seeded(image, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def seeded_pixels(transform: Transform, image: object, seed: int) -> torch.Tensor:
    """One sample as a training batch carries it: uint8 pixels from a :class:`TrainTransform`
    (normalized later, on the device, by :class:`PixelNormalizer`), else the transform's own
    (normalized float) output."""
    if isinstance(transform, TrainTransform):
        return transform.pixels(image, seed)
    return apply_seeded(transform, image, seed)
