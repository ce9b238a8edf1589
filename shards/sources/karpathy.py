"""``karpathy`` source: caption JSON of RSICD, UCM-captions, Sydney-captions, RSITMD."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from shards.captions import clean_captions
from shards.classnames import AID, split_words
from shards.items import Item, Listing, Skip
from shards.options import BuildOptions
from shards.sources.textfile import bad_text, read_text_lenient
from shards.splits import hash_split


def _images_dir(json_path: Path, images: str | None) -> Path:
    if images:
        return Path(images)
    beside = json_path.parent / "images"
    return beside if beside.is_dir() else json_path.parent


def readable_label(label: str) -> str:
    """Prompt-friendly name for a scene label such as RSICD's ``DenseResidential``."""
    return AID.get(label, split_words(label))


def list_karpathy(input_path: str, opts: BuildOptions) -> Listing:
    """List a Karpathy-format caption JSON (``images[].filename/split/sentences[].raw``).

    All captions of an image go into its json; ``.txt`` gets the first. String
    labels become ``classname`` with an integer ``label`` from the sorted class list.

    Raises:
        ValueError: when the file is not JSON with an ``images`` list.
    """
    path = Path(input_path)
    try:
        data = json.loads(read_text_lenient(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"karpathy source: cannot read {path}: {e}") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"karpathy source: {path} has no 'images' list")
    root = _images_dir(path, opts.images)
    val_f, test_f = opts.fractions("karpathy")
    str_labels = sorted({e["label"] for e in entries if isinstance(e, dict) and isinstance(e.get("label"), str)
                         and not bad_text(e["label"])})
    label_index = {c: i for i, c in enumerate(str_labels)}

    items: list[Item] = []
    unassigned: list[Skip] = []
    for n, e in enumerate(entries):
        item_or_skip = _entry(n, e, root, label_index, val_f, test_f)
        (items if isinstance(item_or_skip, Item) else unassigned).append(item_or_skip)
    info: dict[str, Any] = {"images_dir": str(root), "dataset": data.get("dataset") if isinstance(data, dict) else None}
    if str_labels:
        info["readable_classnames"] = [readable_label(c) for c in str_labels]
    return Listing(items, unassigned, classnames=str_labels or None, info=info)


def _entry(n: int, e: Any, root: Path, label_index: dict[str, int], val_f: float, test_f: float) -> Item | Skip:
    where = f"images[{n}]"
    if not isinstance(e, dict):
        return Skip(where, "bad-entry", "entry is not an object")
    filename, filepath = e.get("filename"), e.get("filepath", "")
    split = e.get("split")
    if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
        return Skip(where, "bad-entry", "no filename")
    rel = posixpath.normpath(posixpath.join(filepath, filename))
    if split is None:
        split = hash_split(rel, val_f, test_f)
    if not isinstance(split, str) or not split or bad_text(split) or "/" in split:
        return Skip(where, "bad-entry", f"unusable split {split!r}")
    if bad_text(rel):
        return Item(where, split, pre_skip=("non-utf8", "file name is not UTF-8"))
    sentences = e.get("sentences")
    if not isinstance(sentences, list):
        sentences = []
    raw = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
    captions, dropped = clean_captions(raw)
    label, classname = e.get("label"), None
    if isinstance(label, str):
        classname, label = (label, label_index[label]) if label in label_index else (None, None)
    elif not isinstance(label, int) or isinstance(label, bool):
        label = None
    extra = {k: e[k] for k in ("imgid", "filename") if k in e}
    return Item(rel, split, tuple(captions), label, classname, str(root / rel),
                dropped_captions=tuple(dropped), extra=extra)
