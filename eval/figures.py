"""PNG pictures of evaluation results: confusion matrices and retrieval examples (matplotlib Agg)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

THUMBNAIL = 128
"""Longest side of an image in a retrieval grid, in pixels (AID images are 600 px)."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def confusion_png(cm: torch.Tensor, classnames: list[str], path: Path, title: str) -> Path:
    """A heat map of ``cm`` (rows = true class, columns = predicted class)."""
    plt = _pyplot()
    n = len(classnames)
    size = max(4.0, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(n), labels=classnames, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels=classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class RetrievalExample:
    """One text query and the images it retrieved, best first."""

    query: str
    images: list[int]
    """Indices of the top-k images (as ``open_image`` of :func:`retrieval_grid_png` takes them)."""
    scores: list[float]
    """Cosine similarity of each shown image to the query."""
    correct: list[bool]
    """Whether each shown image is the query's own image."""
    rank: int
    """Rank of the query's own image (0 = first; ties count against it, as in the metrics)."""


def retrieval_grid_png(examples: list[RetrievalExample], open_image: Callable[[int], Image.Image],
                       path: Path, title: str) -> Path:
    """One row per query: its text, then its top-k images with scores; the correct image framed green."""
    plt = _pyplot()
    k = max(len(e.images) for e in examples)
    fig, axes = plt.subplots(len(examples), k + 1, figsize=(2.0 * (k + 1), 2.3 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        row[0].axis("off")
        found = "" if ex.rank < len(ex.images) else f"\n(correct image: rank {ex.rank + 1})"
        row[0].text(0.0, 0.5, textwrap.fill(ex.query, 26) + found, fontsize=8, va="center", wrap=True)
        for j, ax in enumerate(row[1:]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(ex.images):
                ax.axis("off")
                continue
            im = open_image(ex.images[j]).copy()
            im.thumbnail((THUMBNAIL, THUMBNAIL))
            ax.imshow(np.asarray(im))
            color = "green" if ex.correct[j] else "lightgray"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(4 if ex.correct[j] else 1)
            mark = " correct" if ex.correct[j] else ""
            ax.set_title(f"#{j + 1}  {ex.scores[j]:.3f}{mark}", fontsize=8, color="green" if ex.correct[j] else "black")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
