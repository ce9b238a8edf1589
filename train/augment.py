"""Image transforms: overhead-imagery augmentation for training, a plain one for eval.

Overhead images have no canonical "up" or handedness, so flips and 90-degree
rotations are label-preserving (unlike for web photos). Every transform draws
from torch's global RNG; :func:`apply_seeded` runs it under a private seed so a
sample's augmentation is a pure function of that seed (exact resume, results
independent of worker count).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

import train.compat

train.compat.ensure_torchvision()

from torchvision.transforms import InterpolationMode, v2  # noqa: E402

from train.config import AugmentConfig  # noqa: E402

Transform = Callable[[object], torch.Tensor]
"""PIL image -> normalized float32 tensor [3, H, W]."""


class RandomRot90(torch.nn.Module):
    """Rotate an image tensor by a uniformly random multiple of 90 degrees (lossless)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, (1,)))
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


def _to_float(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


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
            v2.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_to_float(mean, std),
        ]
    )


def build_train_transform(
    aug: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Transform:
    """Training transform from ``cfg.data.augment``; the eval transform when disabled.

    Args:
        aug: Which augmentations to apply and how strongly.
        image_size: Output height and width.
        mean: Per-channel normalization mean.
        std: Per-channel normalization std.
    """
    if not aug.enabled:
        return build_eval_transform(image_size, mean, std)
    steps: list = [v2.PILToTensor()]
    if aug.random_resized_crop:
        steps.append(
            v2.RandomResizedCrop(
                image_size,
                scale=tuple(aug.crop_scale),
                ratio=tuple(aug.crop_ratio),
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            )
        )
    else:
        steps += [
            v2.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
        ]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(v2.RandomVerticalFlip())
    if aug.rot90:
        steps.append(RandomRot90())
    if aug.color_jitter > 0 or aug.hue_jitter > 0:
        cj = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue_jitter))
    return v2.Compose(steps + _to_float(mean, std))


def apply_seeded(transform: Transform, image: object, seed: int) -> torch.Tensor:
    """Run ``transform`` with torch's RNG seeded by ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
