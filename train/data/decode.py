"""Turn one raw webdataset sample (a dict of bytes) into (image tensor, caption).

Captions come from ``KEY.json``'s ``"captions"`` list (shards format) and fall back
to ``KEY.txt`` (img2dataset, whose json has no captions). Problems raise
:class:`BadSample` with a short reason that the loader counts.
"""

from __future__ import annotations

import io
import json
import random
from typing import Literal

import torch
from PIL import Image

from train.data.augment import Transform, TrainTransform, apply_seeded
from train.core.rng import stable_seed

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def sample_captions(raw: dict) -> list[str]:
    """All captions of a raw sample: json ``captions`` if present, else the ``.txt``."""
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", str(e)) from e
        caps = meta.get("captions") if isinstance(meta, dict) else None
        if caps:
            good = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
            if good:
                return good
    if "txt" in raw:
        try:
            text = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise BadSample("bad_caption", str(e)) from e
        if text:
            return [text]
    raise BadSample("no_caption")


def open_image(raw: dict) -> Image.Image:
    """Parse the sample's image header with PIL (pixels are decoded later, by :func:`load_rgb`)."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise BadSample("no_image")
    try:
        return Image.open(io.BytesIO(raw[ext]))
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample("decode_error", f"{type(e).__name__}: {e}") from e


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels (truncation shows up here, as BadSample) and make the image RGB."""
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample("decode_error", f"{type(e).__name__}: {e}") from e


def decode_image(raw: dict) -> Image.Image:
    """Decode the sample's image with PIL as RGB."""
    return load_rgb(open_image(raw))


def choose_caption(captions: list[str], mode: Literal["random", "first"], seed: int) -> str:
    """One caption: the first, or one drawn by ``seed`` (a new draw every epoch)."""
    if mode == "first" or len(captions) == 1:
        return captions[0]
    return captions[random.Random(seed).randrange(len(captions))]


def decode_sample_into(
    raw: dict,
    transform: Transform,
    caption_mode: Literal["random", "first"],
    sample_seed: int,
    out: torch.Tensor,
) -> str:
    """Write the sample's augmented image into ``out``; return its chosen caption.

    ``out`` is uint8 for a :class:`~train.data.augment.TrainTransform` (the pixels; engines
    normalize on the device) and float32 for any other transform (its normalized output).

    With a :class:`~train.data.augment.TrainTransform` the augmentation is planned from the
    image header first, so a JPEG much larger than the crop's output is decoded at a
    reduced DCT scale (PIL ``draft``), which is the same crop at a fraction of the cost.

    Raises:
        BadSample: Missing/corrupt image or caption.
    """
    captions = sample_captions(raw)
    caption = choose_caption(captions, caption_mode, stable_seed("caption", sample_seed))
    aug_seed = stable_seed("augment", sample_seed)
    if not isinstance(transform, TrainTransform):
        out.copy_(apply_seeded(transform, decode_image(raw), aug_seed))
        return caption
    img = open_image(raw)
    plan = transform.plan(img.size, aug_seed)
    reduced = transform.decode_size(plan)
    if reduced is not None and img.format == "JPEG":
        img.draft("RGB", reduced)
    out.copy_(transform.augment(load_rgb(img), plan))
    return caption


def decode_sample(
    raw: dict,
    transform: Transform,
    caption_mode: Literal["random", "first"],
    sample_seed: int,
) -> tuple[torch.Tensor, str]:
    """Image tensor (as :func:`decode_sample_into` writes it) and chosen caption of one raw
    sample, randomness drawn from ``sample_seed``.

    Raises:
        BadSample: Missing/corrupt image or caption.
    """
    if isinstance(transform, TrainTransform):
        out = torch.empty(3, transform.image_size, transform.image_size, dtype=torch.uint8)
        return out, decode_sample_into(raw, transform, caption_mode, sample_seed, out)
    captions = sample_captions(raw)
    image = decode_image(raw)
    caption = choose_caption(captions, caption_mode, stable_seed("caption", sample_seed))
    return apply_seeded(transform, image, stable_seed("augment", sample_seed)), caption
