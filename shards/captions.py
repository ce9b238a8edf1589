"""Caption cleaning shared by the sources."""

from __future__ import annotations


def has_surrogates(text: str) -> bool:
    """True when ``text`` came from undecodable bytes (read with ``surrogateescape``)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def clean_captions(raw: list[object]) -> tuple[list[str], list[str]]:
    """Drop unusable captions; return ``(kept, reasons_for_dropped)``.

    Whitespace is normalised (runs -> one space) so that a caption that is only
    whitespace counts as empty. Non-string values and undecodable text are dropped
    with their own reasons rather than guessed at.
    """
    kept: list[str] = []
    dropped: list[str] = []
    for c in raw:
        if not isinstance(c, str):
            dropped.append("not-text")
            continue
        if has_surrogates(c):
            dropped.append("non-utf8")
            continue
        text = " ".join(c.split())
        if not text:
            dropped.append("empty")
            continue
        kept.append(text)
    return kept, dropped
