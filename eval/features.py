"""One cached, batched feature extractor per model, shared by all evaluators."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval.dataset import EvalDataset, open_image


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
    """

    def __init__(self, bundle: Any, device: str | torch.device = "cpu", batch_size: int = 256,
                 progress: bool = True) -> None:
        self.bundle = bundle
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
        """float[N, D] unit image embeddings of ``ds`` (cached by ``ds.key``)."""
        if ds.key in self._images:
            return self._images[ds.key]
        out = []
        bar = tqdm(total=len(ds), desc=f"images {ds.key[:40]}", unit="img", leave=False,
                   disable=None if self.progress else True)  # None: only on a terminal
        with self._inference():
            for start in range(0, len(ds), self.batch_size):
                items = ds.images[start:start + self.batch_size]
                x = torch.stack([self.bundle.eval_transform(open_image(i)) for i in items])
                feats = self.bundle.model.encode_image(x.to(self.device))
                out.append(F.normalize(feats.float(), dim=-1).cpu())
                self.image_batches += 1
                bar.update(len(items))
        bar.close()
        feats = torch.cat(out) if out else torch.zeros(0, 0)
        self._images[ds.key] = feats
        return feats

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
