"""Pictures for TensorBoard: a grid of training samples as the model sees them, and the PNGs
evaluators write (confusion matrices, retrieval examples), as arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def batch_grid(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], max_images: int = 64) -> np.ndarray:
    """HWC uint8 grid of the first ``max_images`` ``[B, 3, H, W]`` images: uint8 pixels as they
    are, float ones un-normalized with ``mean`` and ``std``."""
    x = images[:max_images].detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255
    else:
        x = x.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    n, _, h, w = x.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = torch.ones(3, rows * (h + 2), cols * (w + 2))
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = x[i]
    return (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def png_image(path: Path) -> np.ndarray:
    """An image file as HWC uint8 RGB (for TensorBoard)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
