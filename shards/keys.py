"""Sample keys: no dots (webdataset splits names at the first dot), unique, stable."""

from __future__ import annotations

import hashlib
import re

_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def base_key(source: str) -> str:
    """Key for a relative path: extension dropped, every other unsafe run -> ``_``."""
    stem = source.rsplit(".", 1)[0] if "." in source.rsplit("/", 1)[-1] else source
    key = _BAD.sub("_", stem).strip("_")
    return key or "sample"


def assign_keys(sources: list[str]) -> list[str]:
    """Unique keys for ``sources`` (deterministic for a given list).

    A key shared by several inputs (``a.b.jpg`` and ``a_b.png``) gets a suffix
    from a hash of the path, so it does not depend on the order of the others;
    repeated identical paths fall back to a counter in list order.
    """
    bases = [base_key(s) for s in sources]
    counts: dict[str, int] = {}
    for b in bases:
        counts[b] = counts.get(b, 0) + 1
    used: set[str] = {b for b in bases if counts[b] == 1}
    keys = []
    for src, b in zip(sources, bases):
        if counts[b] == 1:
            keys.append(b)
            continue
        key = f"{b}_{hashlib.sha1(src.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        n = 1
        while key in used:
            n += 1
            key = f"{b}_{hashlib.sha1(src.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}_{n}"
        used.add(key)
        keys.append(key)
    return keys
