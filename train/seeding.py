"""Stable seeds derived from tuples of values.

Python's ``hash`` is salted per process, so DataLoader workers and resumed runs
would disagree; a keyed digest of the values' ``repr`` is the same everywhere.
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints, strings, ...).

    Args:
        *parts: Values whose ``repr`` identifies the random stream, e.g.
            ``("sample", seed, epoch, key)``.

    Returns:
        A non-negative int usable by ``random.Random``, numpy and ``torch.manual_seed``.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
