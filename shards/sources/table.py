"""``csv`` source: a table of image paths and captions (several rows per image allowed)."""

from __future__ import annotations

import csv
import io
import posixpath
from pathlib import Path

from shards.captions import clean_captions
from shards.items import Item, Listing, Skip
from shards.options import BuildOptions
from shards.sources.textfile import bad_text, read_text_lenient
from shards.splits import hash_split


def list_csv(input_path: str, opts: BuildOptions) -> Listing:
    """List a CSV of ``image,caption[,split][,label]`` rows; paths relative to ``--images``.

    A row with non-UTF-8 bytes is dropped with reason ``non-utf8`` (if it was an
    image's only row, the image is skipped with that reason).

    Raises:
        ValueError: when the file cannot be read or lacks a named column.
    """
    path = Path(input_path)
    try:
        text = read_text_lenient(path)
    except OSError as e:
        raise ValueError(f"csv source: cannot read {path}: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=opts.separator)
    header = reader.fieldnames or []
    for col in (opts.image_column, opts.caption_column, opts.split_column, opts.label_column):
        if col is not None and col not in header:
            raise ValueError(f"csv source: column {col!r} not in header {header}")
    root = Path(opts.images) if opts.images else path.parent
    val_f, test_f = opts.fractions("csv")

    groups: dict[str, dict] = {}
    unassigned: list[Skip] = []
    items: list[Item] = []
    for rowno, row in enumerate(reader, 2):
        image = (row.get(opts.image_column) or "").strip()
        split = (row.get(opts.split_column) or "").strip() if opts.split_column else ""
        label = (row.get(opts.label_column) or "").strip() if opts.label_column else ""
        caption = row.get(opts.caption_column)
        where = f"{path.name}:row{rowno}"
        if bad_text(image, split, label) or not image:
            reason, detail = ("non-utf8", "row is not UTF-8") if bad_text(image, split, label) else (
                "bad-row", "empty image path")
            if split and not bad_text(split):
                items.append(Item(where, split, pre_skip=(reason, detail)))
            else:
                unassigned.append(Skip(where, reason, detail))
            continue
        rel = posixpath.normpath(image.replace("\\", "/"))
        g = groups.setdefault(rel, {"split": split or hash_split(rel, val_f, test_f), "label": label,
                                    "raw": [], "bad_rows": 0, "rows": []})
        g["rows"].append(rowno)
        if bad_text(caption):
            g["bad_rows"] += 1  # the whole row goes, as documented
        else:
            g["raw"].append(caption)

    labels = [g["label"] for g in groups.values() if g["label"]]
    numeric = bool(labels) and all(lab.lstrip("-").isdigit() for lab in labels)
    classnames = None if numeric or not labels else sorted(set(labels))
    index = {c: i for i, c in enumerate(classnames or [])}
    for rel, g in groups.items():
        captions, dropped = clean_captions(g["raw"])
        dropped += ["non-utf8"] * g["bad_rows"]
        lab = g["label"]
        label, classname = (int(lab), None) if numeric and lab else ((index[lab], lab) if lab else (None, None))
        items.append(Item(rel, g["split"], tuple(captions), label, classname, str(root / rel),
                          dropped_captions=tuple(dropped), extra={"csv_rows": g["rows"]}))
    return Listing(items, unassigned, classnames=classnames, info={"images_dir": str(root), "csv": path.name})
