"""Text<->image retrieval (RemoteCLIP protocol) and image->image retrieval by class.

Every caption of an image is a correct answer for that image: image->text is a hit
at k if *any* of its captions ranks in the top k; text->image has exactly one
correct image per caption. Ties count against the model (see eval.metrics).
Metric names follow CLIP_benchmark: ``image_retrieval_recall@k`` is text->image,
``text_retrieval_recall@k`` is image->text; ``mean_recall`` (mR) is their mean over
all reported k. ``image_image_recall@k`` is leave-one-out retrieval of another image
of the same class.

Captions repeat word for word across images (template captions, RSICD's stock phrases);
the strict metrics above, which published protocols (RemoteCLIP) report, count an
identical caption of another image as a miss. Each also comes as ``NAME_dedup``
(``image_retrieval_recall@k_dedup``, ``text_retrieval_recall@k_dedup``,
``mean_recall_dedup``), where a right answer is any image or caption whose text equals
a right one's (after stripping surrounding whitespace, nothing more): text->image hits
any image that has the query's text among its captions, image->text any caption whose
text is one of the image's own captions. Without duplicates the two sets are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from eval import metrics
from eval.context import EvalContext, EvalError
from eval.dataset import open_image
from eval.figures import RetrievalExample, retrieval_grid_png
from eval.registry import Metric, register
from train.api import ConfigError


@dataclass
class RetrievalOptions:
    """Options of the ``retrieval`` evaluator."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    image_image: bool = True
    """Also report image->image R@k by class where the split has labels."""
    examples: int = 4
    """Text queries shown in retrieval_examples.png (when there is an output folder); 0 = no picture."""
    examples_k: int = 5
    """Images shown per query in that picture."""

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("retrieval.ks must be positive integers")
        if self.examples < 0 or self.examples_k < 1:
            raise ConfigError("retrieval.examples must be >= 0 and retrieval.examples_k >= 1")


def caption_owners(captions: list[list[str]]) -> tuple[list[str], torch.Tensor, list[int]]:
    """Flatten captions: (texts, owner image index per text, images that have captions)."""
    texts, owners, with_caps = [], [], []
    for i, caps in enumerate(captions):
        caps = [c for c in caps if c and c.strip()]
        if caps:
            with_caps.append(i)
        texts.extend(caps)
        owners.extend([i] * len(caps))
    return texts, torch.tensor(owners, dtype=torch.long), with_caps


def text_ids(texts: list[str]) -> torch.Tensor:
    """long[M]: one id per distinct caption text (surrounding whitespace stripped), in first-seen order."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t.strip(), len(ids)) for t in texts], dtype=torch.long)


def same_text_positive(owners: torch.Tensor, ids: torch.Tensor, n_images: int) -> torch.Tensor:
    """bool[N, M]: True where image i has a caption whose text is that of caption j.

    One matrix serves both directions (caption j is a right answer for image i exactly when
    image i is one for caption j); built by grouping captions by text id, no pairwise compare.
    """
    has_text = torch.zeros(n_images, int(ids.max()) + 1 if len(ids) else 0, dtype=torch.bool)
    has_text[owners, ids] = True
    return has_text[:, ids]


def _recalls(sim: torch.Tensor, positive: torch.Tensor, ks: list[int], suffix: str) -> dict[str, float]:
    i2t = metrics.recall_at_k(metrics.retrieval_ranks(sim, positive), ks)
    t2i = metrics.recall_at_k(metrics.retrieval_ranks(sim.T, positive.T), ks)
    out = {f"image_retrieval_recall@{k}{suffix}": v for k, v in t2i.items()}
    out.update({f"text_retrieval_recall@{k}{suffix}": v for k, v in i2t.items()})
    out[f"mean_recall{suffix}"] = (sum(t2i.values()) + sum(i2t.values())) / (2 * len(ks))
    return out


def text_image_recalls(image_feats: torch.Tensor, text_feats: torch.Tensor, owners: torch.Tensor,
                       ks: list[int], ids: torch.Tensor | None = None) -> dict[str, float]:
    """R@k both ways and their mean for images with captions (``owners[j]`` = image of text j).

    Args:
        ids: text id of each caption (:func:`text_ids`); given, the ``*_dedup`` metrics are
            added, which count an identical caption text as a right answer.
    """
    sim = image_feats @ text_feats.T  # [N, M]
    positive = owners[None, :] == torch.arange(len(image_feats))[:, None]
    out = _recalls(sim, positive, ks, "")
    if ids is not None:
        out.update(_recalls(sim, same_text_positive(owners, ids, len(image_feats)), ks, "_dedup"))
    return out


def retrieval_examples(image_feats: torch.Tensor, text_feats: torch.Tensor, owners: torch.Tensor,
                       texts: list[str], n: int, k: int) -> list[RetrievalExample]:
    """Text->image results of ``n`` evenly spaced queries: their top-``k`` images, best first.

    Indices refer to the rows of ``image_feats``; ``owners[j]`` is the image of text ``j``.
    Ties go against the correct image, then by index, so its position in the picture is
    the rank the metrics count (and the picture is reproducible).
    """
    picks = sorted({int(i * len(texts) / n) for i in range(min(n, len(texts)))})
    sim = text_feats[picks] @ image_feats.T  # [n, N]
    positive = owners[picks][:, None] == torch.arange(len(image_feats))[None, :]
    ranks = metrics.retrieval_ranks(sim, positive)
    out = []
    for row, j in enumerate(picks):
        wrong_first = torch.argsort(positive[row].long(), stable=True)
        order = wrong_first[torch.sort(sim[row, wrong_first], descending=True, stable=True).indices][:k].tolist()
        out.append(RetrievalExample(query=texts[j], images=order, scores=[float(sim[row, i]) for i in order],
                                    correct=[i == int(owners[j]) for i in order], rank=int(ranks[row])))
    return out


def image_image_recalls(feats: torch.Tensor, labels: torch.Tensor, ks: list[int]) -> tuple[dict[str, float], int]:
    """Leave-one-out image->image R@k by class; returns (metrics, queries without a same-class peer)."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    has_peer = (same & ~eye).any(1)
    q = has_peer.nonzero().squeeze(1)
    if len(q) == 0:
        return {}, len(labels)
    sim = feats[q] @ feats.T
    ranks = metrics.retrieval_ranks(sim, same[q], ignore=eye[q])
    return {f"image_image_recall@{k}": v for k, v in metrics.recall_at_k(ranks, ks).items()}, int((~has_peer).sum())


@register("retrieval", RetrievalOptions, needs_captions=True)
def retrieval(ctx: EvalContext, opts: RetrievalOptions) -> Iterator[Metric]:
    """Yields text/image retrieval R@k, mean_recall, their ``_dedup`` forms, n_images, n_texts
    (+ image_image_recall@k)."""
    ds = ctx.dataset
    texts, owners, with_caps = caption_owners(ds.captions)
    if not texts:
        raise EvalError(f"benchmark {ctx.spec.name}: retrieval needs captions; the split has none")
    if len(with_caps) < len(ds):
        ctx.info["images_without_captions"] = len(ds) - len(with_caps)
    feats = ctx.extractor.image_features(ds)
    # images without captions cannot be retrieved by text: leave them out of both directions
    remap = torch.full((len(ds),), -1, dtype=torch.long)
    remap[with_caps] = torch.arange(len(with_caps))
    text_feats = ctx.extractor.text_features(texts)
    # every rank holds all gathered image features and all texts here, so the dedup
    # metrics, like the strict ones, come out the same on every rank without a collective
    results = text_image_recalls(feats[with_caps], text_feats, remap[owners], opts.ks, ids=text_ids(texts))
    yield from results.items()
    path = ctx.figure_path("retrieval_examples") if opts.examples else None
    if path is not None:
        examples = retrieval_examples(feats[with_caps], text_feats, remap[owners], texts,
                                      opts.examples, opts.examples_k)
        retrieval_grid_png(examples, lambda i: open_image(ds.images[with_caps[i]]), path,
                           title=f"{ctx.spec.name}: text -> image, top {opts.examples_k}")
    yield "n_images", float(len(with_caps))
    yield "n_texts", float(len(texts))
    labelled = ds.labelled
    if opts.image_image and len(labelled) > 1:
        labels = torch.tensor([ds.labels[i] for i in labelled])
        ii, lonely = image_image_recalls(feats[labelled], labels, opts.ks)
        if lonely:
            ctx.info["image_image_queries_without_peer"] = lonely
        yield from ii.items()
