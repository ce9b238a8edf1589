"""Unit-length embeddings of images and texts, batched, the same way for the index and queries.

The precision policy is the eval harness's (:class:`eval.features.FeatureExtractor`): bf16
autocast on CUDA, fp32 on CPU. Images and queries go through this one class so that an
indexed image queried by itself gets the very vector it was indexed with.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from search.errors import SearchError


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """RGB PIL image from encoded bytes.

    Raises:
        SearchError: the bytes are not an image PIL can read.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise SearchError(f"cannot read {what}: not an image format PIL can decode (JPEG, PNG, TIFF, WebP ...)") \
            from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SearchError(f"cannot read {what}: {type(e).__name__}: {e}") from None


class Encoder:
    """Embeds with one model on one device.

    Args:
        bundle: a ``ClipBundle`` (``model``, ``tokenizer``, ``eval_transform``).
        device: where the model is.
        batch_size: images per forward pass.
    """

    def __init__(self, bundle: Any, device: torch.device, batch_size: int = 256) -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self.batch_size = batch_size
        bundle.model.eval()

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            yield

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32[N, D] unit image embeddings."""
        out = []
        with self._inference():
            for start in range(0, len(images), self.batch_size):
                x = torch.stack([self.bundle.eval_transform(im) for im in images[start:start + self.batch_size]])
                feats = self.bundle.model.encode_image(x.to(self.device))
                out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32[N, D] unit text embeddings."""
        out = []
        with self._inference():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.bundle.tokenizer(list(texts[start:start + self.batch_size]))
                feats = self.bundle.model.encode_text(tokens.to(self.device))
                out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)
