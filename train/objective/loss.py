"""Contrastive losses on local features, gathered across ranks with gradient: the plain
(reference) implementations and :func:`build_loss`, which returns the tiled ones (:mod:`.tiled`).

Scaling contract (checked by tests/test_equivalence.py): with ``W`` ranks of ``B``
local rows each (``N = W*B``), rank ``r`` returns a loss ``L_r`` over its own rows
against all ``N`` columns such that ``mean_r L_r`` is the single-process loss of the
whole ``N`` batch. Gradients that ``L_r`` sends to other ranks' features travel back
through the gather, and DDP's gradient *averaging* then yields exactly the full-batch
gradient ``dL/dθ`` — also for the logit scale/bias, whose gradient is not gathered but
is simply averaged (``mean_r dL_r/ds = dL/ds``).

Temperature: the learnable log-scale is clamped *in place after the optimizer step*
(:func:`clamp_logit_scale_`), as open_clip's trainer does, rather than in the forward:
a clamp in the forward would zero the scale's gradient at the limit and hide it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.core.config import LossConfig
from train.objective import gather as _gather
from train.objective.gather import GatherFn
from train.objective.tiled import TiledClipLoss, TiledSigLipLoss


def _local_labels(local: int, rank: int, device: torch.device) -> torch.Tensor:
    # Rank r's rows are the global rows [r*B, (r+1)*B): their positives sit there too.
    return torch.arange(local, device=device) + rank * local


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) over the global batch, computed for the local rows.

    ``L_r = (CE(s * I_r @ T_all^T) + CE(s * T_r @ I_all^T)) / 2`` with mean reduction
    over the ``B`` local rows, so the mean over ranks is the full-batch CLIP loss.
    """

    def __init__(self, gather_fn: GatherFn | None = None) -> None:
        super().__init__()
        self.gather_fn = gather_fn or _gather.all_gather_with_grad

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the local rows.

        Args:
            image_features: ``[B, D]`` normalized local image embeddings.
            text_features: ``[B, D]`` normalized local text embeddings.
            logit_scale: the (already exponentiated) temperature scale, 0-dim.
            logit_bias: optional bias. A constant shift leaves softmax unchanged (its
                gradient is exactly 0); it is added anyway so every parameter is in
                the graph and DDP needs no unused-parameter search.

        Returns:
            0-dim loss ``L_r``.
        """
        all_images = self.gather_fn(image_features)
        all_texts = self.gather_fn(text_features)
        rank = _gather.rank()
        labels = _local_labels(image_features.shape[0], rank, image_features.device)
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid (SigLIP) loss, exact over the global batch.

    Each rank scores its local images against all texts (gathered with gradient).
    open_clip's normalization is ``-sum(logsigmoid(labels * logits)) / N`` for an
    ``N``-batch; dividing the local sum by the *local* ``B`` makes ``mean_r L_r`` equal
    that full-batch value (open_clip exchanges neighbours instead; the sums agree).
    """

    def __init__(self, gather_fn: GatherFn | None = None) -> None:
        super().__init__()
        self.gather_fn = gather_fn or _gather.all_gather_with_grad

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the local image rows against all texts.

        Args:
            image_features: ``[B, D]`` normalized local image embeddings.
            text_features: ``[B, D]`` normalized local text embeddings.
            logit_scale: exponentiated scale, 0-dim.
            logit_bias: the learnable bias (required: SigLIP is unusable without it).

        Returns:
            0-dim loss ``L_r``.
        """
        if logit_bias is None:
            raise ValueError("SigLIP loss needs a model with a logit_bias (set model.init_logit_bias, e.g. -10)")
        all_texts = self.gather_fn(text_features)
        local = image_features.shape[0]
        logits = logit_scale * image_features @ all_texts.T + logit_bias
        labels = -torch.ones_like(logits)
        rows = torch.arange(local, device=logits.device)
        labels[rows, _local_labels(local, _gather.rank(), logits.device)] = 1.0
        return -F.logsigmoid(labels * logits).sum() / local


def build_loss(cfg: LossConfig, gather_fn: GatherFn | None = None) -> nn.Module:
    """The loss named by ``cfg.kind`` (``clip`` or ``siglip``), tiled in blocks of
    ``cfg.block_size`` (:mod:`.tiled`) at every batch size: one code path. :class:`ClipLoss`
    and :class:`SigLipLoss` stay as the reference the tests compare it with."""
    if cfg.kind == "clip":
        return TiledClipLoss(cfg.block_size, gather_fn)
    if cfg.kind == "siglip":
        return TiledSigLipLoss(cfg.block_size, gather_fn)
    raise ValueError(f"unknown loss.kind {cfg.kind!r}; expected 'clip' or 'siglip'")


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module, logit_scale_max: float) -> None:
    """Clamp the model's log-scale to at most ``log(logit_scale_max)``, in place.

    Call after each optimizer step. ``logit_scale_max`` is a scale (e.g. 100), the
    parameter is its log.
    """
    if logit_scale_max <= 0:
        raise ValueError(f"loss.logit_scale_max must be > 0, got {logit_scale_max}")
    model.logit_scale.clamp_(max=math.log(logit_scale_max))
