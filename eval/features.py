"""One cached, batched feature extractor per model, shared by all evaluators.

Evaluation can be shared by the ranks of a distributed job: with a :class:`Partition`
each rank encodes a contiguous, balanced slice of every image set and the slices are
gathered, so every rank ends up with the same full features and runs the same
evaluators on them. ``eval`` never calls ``torch.distributed`` itself; the caller
(the trainer) passes an object implementing :class:`Partition` over its process group.

Invariant (what keeps the collectives aligned): every rank evaluates the same
benchmarks, in the same order, with the same options and data, so every rank asks
for the same image sets in the same order and calls ``gather_rows`` the same number
of times (twice per image set not yet cached). Text features are computed in full on
every rank and involve no collective.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval.dataset import EvalDataset, ImageItem, open_image


class Partition(Protocol):
    """This process's share of a distributed evaluation (implemented by the caller).

    Attributes:
        rank: this process, ``0 <= rank < world``.
        world: number of processes sharing the evaluation.
    """

    rank: int
    world: int

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenation of every rank's ``local`` rows, in rank order (a collective).

        ``local`` is a float32 CPU tensor ``[n_rank, D]``; ``n_rank`` may differ between
        ranks (even be 0), ``D`` is the same. Returns a float32 CPU tensor ``[sum n_rank, D]``.
        Every rank calls it the same number of times in the same order.
        """
        ...


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` rows (sizes differ by <= 1)."""
    return n * rank // world, n * (rank + 1) // world


class FeatureExtractor:
    """Encodes images and texts of one model, caching results for the whole run.

    Image features are cached per dataset key, text features per prompt list.
    Features come back L2-normalized, float32, on the CPU. On CUDA the towers
    run under bf16 autocast; on CPU in fp32 (CPU bf16 is slow and inexact).

    Args:
        bundle: a ``train.model.ClipBundle`` or anything with ``model``
            (``encode_image``/``encode_text``), ``tokenizer`` and ``eval_transform``.
        device: where the model runs.
        batch_size: images or texts per forward pass.
        progress: show a tqdm bar while encoding images.
        partition: share image encoding with the other ranks (see the module docstring);
            None = encode everything here.
    """

    def __init__(self, bundle: Any, device: str | torch.device = "cpu", batch_size: int = 256,
                 progress: bool = True, partition: Partition | None = None) -> None:
        if partition is not None and not 0 <= partition.rank < partition.world:
            raise ValueError(f"partition rank {partition.rank} is not in [0, {partition.world})")
        self.bundle = bundle
        self.partition = partition
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self._images: dict[str, torch.Tensor] = {}
        self._texts: dict[tuple[str, ...], torch.Tensor] = {}
        self.image_batches = 0
        """Forward passes of the image tower so far (lets tests see the cache work)."""
        self.text_batches = 0

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        model = self.bundle.model
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        try:
            with torch.inference_mode(), amp:
                yield
        finally:
            # the trainer calls us mid-run: hand the model back as we found it
            if hasattr(model, "train"):
                model.train(was_training)

    def image_features(self, ds: EvalDataset) -> torch.Tensor:
        """float[N, D] unit image embeddings of ``ds`` (cached by ``ds.key``).

        With a partition this rank encodes only its slice; the result is the same on every rank.
        """
        if ds.key in self._images:
            return self._images[ds.key]
        if self.partition is None:
            feats = self._encode_images(ds.images, ds.key)
        else:
            feats = self._shared_image_features(ds, self.partition)
        self._images[ds.key] = feats
        return feats

    def _shared_image_features(self, ds: EvalDataset, part: Partition) -> torch.Tensor:
        """Encode this rank's slice of ``ds`` and gather every rank's rows, in order."""
        n = len(ds)
        if n == 0:  # the same on every rank: nobody gathers
            return torch.zeros(0, 0)
        start, stop = shard_bounds(n, part.rank, part.world)
        error: Exception | None = None
        try:
            local = self._encode_images(ds.images[start:stop], ds.key)
        except Exception as e:  # re-raised below, after the other ranks learned of it
            error, local = e, torch.zeros(0, 0)
        # Agree on success (and learn D, which a rank with no rows cannot know) before
        # gathering rows: a rank failing alone must not leave the others blocked.
        status = part.gather_rows(torch.tensor([[float(error is None), float(local.shape[1])]]))
        failed = [r for r in range(part.world) if status[r, 0] != 1]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{ds.key}: image encoding failed on rank(s) {failed}")
        if local.shape[0] == 0:
            local = torch.zeros(0, int(status[:, 1].max()))
        feats = part.gather_rows(local)
        if feats.shape[0] != n:
            raise RuntimeError(f"{ds.key}: Partition.gather_rows returned {feats.shape[0]} rows for {n} images")
        return feats

    def _encode_images(self, images: list[ImageItem], name: str) -> torch.Tensor:
        """float[len(images), D] unit embeddings, in order (float[0, 0] for no images)."""
        out = []
        bar = tqdm(total=len(images), desc=f"images {name[:40]}", unit="img", leave=False,
                   disable=None if self.progress else True)  # None: only on a terminal
        with self._inference():
            for start in range(0, len(images), self.batch_size):
                items = images[start:start + self.batch_size]
                x = torch.stack([self.bundle.eval_transform(open_image(i)) for i in items])
                feats = self.bundle.model.encode_image(x.to(self.device))
                out.append(F.normalize(feats.float(), dim=-1).cpu())
                self.image_batches += 1
                bar.update(len(items))
        bar.close()
        return torch.cat(out) if out else torch.zeros(0, 0)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """float[N, D] unit text embeddings (cached per list of texts)."""
        key = tuple(texts)
        if key in self._texts:
            return self._texts[key]
        out = []
        with self._inference():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.bundle.tokenizer(list(texts[start:start + self.batch_size]))
                feats = self.bundle.model.encode_text(tokens.to(self.device))
                out.append(F.normalize(feats.float(), dim=-1).cpu())
                self.text_batches += 1
        feats = torch.cat(out)
        self._texts[key] = feats
        return feats
