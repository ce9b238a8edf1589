"""Reading caption/metadata files whose bytes may not all be UTF-8."""

from __future__ import annotations

from pathlib import Path

from shards.captions import has_surrogates


def read_text_lenient(path: str | Path) -> str:
    """File text with undecodable bytes kept as surrogates, so bad rows can be skipped one by one."""
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def bad_text(*values: object) -> bool:
    """True when any string value came from non-UTF-8 bytes."""
    return any(isinstance(v, str) and has_surrogates(v) for v in values)
