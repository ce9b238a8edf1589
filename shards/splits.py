"""Split assignment: split files, deterministic path hashing, split order."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

#: Leakage/dedup order: an image seen in an earlier split is a leak in a later one.
CANONICAL_ORDER = ("train", "val", "test")


def split_order(splits: list[str] | set[str]) -> list[str]:
    """Splits in processing order: train, val, test, then the others sorted."""
    known = [s for s in CANONICAL_ORDER if s in splits]
    return known + sorted(s for s in splits if s not in CANONICAL_ORDER)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are in [0, 1) and sum below 1."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must be below 1")


def hash_split(rel_path: str, val_fraction: float, test_fraction: float) -> str:
    """Split of one input from a hash of its relative path.

    Hashing the path (not its position) keeps a file's split stable when files
    are added, removed or listed in another order.
    """
    digest = hashlib.sha256(rel_path.encode("utf-8", "surrogateescape")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_split_file(path: str | Path) -> dict[tuple[str, str], str]:
    """Read a ``split,class,filename`` CSV (header optional) into {(class, filename): split}.

    Raises:
        ValueError: on a malformed row or a file listed twice with different splits.
    """
    out: dict[tuple[str, str], str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and [c.strip().lower() for c in row] == ["split", "class", "filename"]:
                continue
            if len(row) != 3:
                raise ValueError(f"{path}:{lineno}: expected split,class,filename, got {row!r}")
            split, cls, name = (c.strip() for c in row)
            prev = out.setdefault((cls, name), split)
            if prev != split:
                raise ValueError(f"{path}:{lineno}: {cls}/{name} is listed in {prev} and {split}")
    return out
