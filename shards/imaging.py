"""Decode one input image, make it RGB where that is faithful, and encode JPEG bytes."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

from shards.items import SkipError

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


@dataclass(frozen=True)
class Encoded:
    """An image ready to be stored.

    Attributes:
        jpeg: RGB JPEG bytes.
        digest: Hash of the decoded RGB pixels (for de-duplication across formats).
        width: Stored width.
        height: Stored height.
        passthrough: True when ``jpeg`` is the input file unchanged.
    """

    jpeg: bytes
    digest: str
    width: int
    height: int
    passthrough: bool


def _opaque(alpha: Image.Image) -> bool:
    lo, hi = alpha.getextrema()
    return lo == 255 and hi == 255


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB where no information is invented or lost beyond bit depth.

    Raises:
        SkipError: for real transparency, 4-band rasters (e.g. RGB+NIR) and modes
            with no faithful RGB reading.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "CMYK", "YCbCr", "1"):
        return img.convert("RGB")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        if not has_alpha:
            return img.convert("RGB")
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        if not _opaque(img.getchannel("A")):
            raise SkipError("transparency", f"{mode} image with non-opaque alpha")
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img)
        if arr.ndim != 2 or (arr.size and (arr.min() < 0 or arr.max() > 65535)):
            raise SkipError("unsupported-mode", f"{mode} values outside 16-bit range")
        # Fixed full-range scaling keeps brightness comparable across images
        # (a per-image stretch would not).
        eight = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    if mode == "RGBX":
        raise SkipError("multiband", "4-band raster without alpha (e.g. RGB+NIR); no faithful RGB")
    raise SkipError("unsupported-mode", f"image mode {mode}")


def _resize_shorter(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == side:
        return img
    scale = side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Deterministic RGB JPEG bytes of ``img`` (no EXIF, fixed settings)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pixel_digest(img: Image.Image) -> str:
    """Hash of an RGB image's size and pixels."""
    h = hashlib.sha256(f"{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _tiff_samples(img: Image.Image | None = None, data: bytes | None = None) -> int | None:
    """SamplesPerPixel of a TIFF (from an opened image or raw bytes), else None."""
    try:
        if img is not None:
            tags = getattr(img, "tag_v2", None)
            return int(tags[277]) if tags is not None and 277 in tags else None
        if data is None or data[:4] not in (b"II*\0", b"MM\0*"):
            return None
        ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh=data[:8])
        fp = io.BytesIO(data)
        fp.seek(ifd.next)
        ifd.load(fp)
        return int(ifd[277]) if 277 in ifd else None
    except Exception:  # a damaged header just means "unknown"
        return None


def _decode_error(e: Exception) -> SkipError:
    msg = f"{type(e).__name__}: {e}"
    truncated = "truncat" in msg.lower() or isinstance(e, EOFError)
    return SkipError("truncated-image" if truncated else "unreadable-image", msg)


def encode_image(data: bytes, resize: int | None = None, quality: int = 95) -> Encoded:
    """Decode image file bytes and produce the JPEG to store.

    A valid RGB JPEG that needs no resizing is passed through byte for byte.

    Raises:
        SkipError: with reason ``empty-file``, ``unreadable-image``,
            ``truncated-image``, ``too-large`` or one from :func:`to_rgb`.
    """
    if not data:
        raise SkipError("empty-file", "zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
        bands = _tiff_samples(img=img)
        if bands is not None and bands > len(img.getbands()):
            # Pillow reads RGB + an unspecified 4th band as plain RGB, silently
            # dropping a band (e.g. NIR); that is not the same image.
            raise SkipError("multiband", f"{bands}-band TIFF read as {img.mode}")
        img.load()
    except SkipError:
        raise
    except UnidentifiedImageError:
        bands = _tiff_samples(data=data)
        if bands is not None and bands > 3:
            raise SkipError("multiband", f"{bands}-band TIFF (no RGB reading)") from None
        raise SkipError("unreadable-image", "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise SkipError("too-large", str(e)) from None
    except Exception as e:  # any decoder error is a property of this one input
        raise _decode_error(e) from None
    rgb = to_rgb(img)
    digest = pixel_digest(rgb)
    needs_resize = resize is not None and min(rgb.size) != resize
    if img.format == "JPEG" and img.mode == "RGB" and not needs_resize:
        return Encoded(data, digest, rgb.size[0], rgb.size[1], True)
    if needs_resize:
        rgb = _resize_shorter(rgb, resize)
    return Encoded(encode_jpeg(rgb, quality), digest, rgb.size[0], rgb.size[1], False)
