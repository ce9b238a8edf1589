"""Records passed between a source, the image workers and the shard writer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Item:
    """One input sample as a source lists it (before any image is read).

    Attributes:
        source: Input path relative to the source root (stable, used for keys/splits).
        split: Split name the sample goes to.
        captions: Cleaned captions (empty -> the sample is skipped as "no-caption").
        label: Integer class index, if labelled.
        classname: Readable class name, if labelled.
        path: Absolute image path (None for synthetic items).
        synthetic_index: Scene index for the synthetic source.
        pre_skip: ``(reason, detail)`` when the source already knows the input is bad.
        dropped_captions: Reason per caption the source dropped (counted in stats).
        extra: Additional JSON fields to store with the sample.
        key: Sample key, assigned by the builder.
    """

    source: str
    split: str
    captions: tuple[str, ...] = ()
    label: int | None = None
    classname: str | None = None
    path: str | None = None
    synthetic_index: int | None = None
    pre_skip: tuple[str, str] | None = None
    dropped_captions: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def with_key(self, key: str) -> "Item":
        """Return a copy carrying ``key``."""
        return dataclasses.replace(self, key=key)


@dataclass(frozen=True)
class Skip:
    """An input that was not written, with a short reason code and a detail."""

    source: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        """JSON form used in stats files."""
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass
class Listing:
    """Everything a source found in its input.

    Attributes:
        items: Samples assigned to a split (in any order; the builder sorts them).
        unassigned: Inputs rejected before a split could be known (e.g. an
            undecodable CSV row); reported in the manifest.
        classnames: Class names (index = label) when the source is labelled.
        templates: Caption templates used (folder source).
        info: Source-specific facts for the manifest.
    """

    items: list[Item]
    unassigned: list[Skip] = field(default_factory=list)
    classnames: list[str] | None = None
    templates: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class SkipError(Exception):
    """Raised by image/text handling for an input that must be skipped."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
