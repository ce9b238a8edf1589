"""Zero-shot classifier weights from class names x templates (prompt ensembling)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def fill_template(template: str, classname: str) -> str:
    """Put a class name into a CLIP-style template (``{}`` or ``{c}`` placeholder)."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}' (or '{{c}}')")
    return template.replace("{}", classname)


def class_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: class 0 with every template, then class 1, ..."""
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    return [fill_template(t, c) for c in classnames for t in templates]


def ensemble(text_features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Prompt ensembling as in CLIP: mean of L2-normalized prompt embeddings per class,
    renormalized.

    Args:
        text_features: float[C * T, D], class-major (see :func:`class_prompts`).
        num_classes: C.

    Returns:
        float[C, D], unit rows.
    """
    if text_features.shape[0] % num_classes:
        raise ValueError(f"{text_features.shape[0]} prompts do not split into {num_classes} classes")
    per_class = F.normalize(text_features.float(), dim=-1).reshape(num_classes, -1, text_features.shape[-1])
    return F.normalize(per_class.mean(1), dim=-1)


def zeroshot_weights(
    encode: Callable[[list[str]], torch.Tensor], classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """Class embeddings float[C, D] for zero-shot classification.

    Args:
        encode: maps a list of texts to their (cached) embeddings.
        classnames: readable class names, index = label.
        templates: prompt templates, each with one ``{}``.
    """
    return ensemble(encode(class_prompts(classnames, templates)), len(classnames))
