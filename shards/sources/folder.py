"""``folder`` source: one sub-folder per class, captions from templates."""

from __future__ import annotations

import os
from pathlib import Path

from shards.classnames import read_mapping, resolve_classnames
from shards.items import Item, Listing, Skip
from shards.options import BuildOptions
from shards.splits import hash_split, read_split_file

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


def _walk_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a sorted relative POSIX path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            out.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(out)


def list_folder(input_path: str, opts: BuildOptions) -> Listing:
    """List a class-folder dataset (EuroSAT, UC Merced, AID, RSSCN7 layouts).

    Raises:
        ValueError: when the input is not a folder with class sub-folders.
    """
    root = Path(input_path)
    if not root.is_dir():
        raise ValueError(f"folder source: {root} is not a directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ValueError(f"folder source: {root} has no class sub-folders")
    mapping = read_mapping(opts.class_map) if opts.class_map else None
    names, origin = resolve_classnames(folders, opts.dataset, mapping)
    split_map = read_split_file(opts.split_file) if opts.split_file else None
    val_f, test_f = opts.fractions("folder")

    items: list[Item] = []
    unassigned: list[Skip] = []

    def split_of(cls: str, name: str, rel: str) -> str | None:
        if split_map is None:
            return hash_split(rel, val_f, test_f)
        return split_map.get((cls, name))

    seen: set[tuple[str, str]] = set()
    for label, (cls, classname) in enumerate(zip(folders, names)):
        captions = tuple(t.format(classname) for t in opts.templates)
        for name in _walk_files(root / cls):
            rel = f"{cls}/{name}"
            seen.add((cls, name))
            split = split_of(cls, name, rel)
            if split is None:
                unassigned.append(Skip(rel, "not-in-split-file", "file not listed in the split file"))
                continue
            pre = None
            if Path(name).suffix.lower() not in IMAGE_EXTS:
                pre = ("not-an-image", f"extension {Path(name).suffix or '(none)'} is not an image type")
            items.append(Item(rel, split, captions, label, classname, str(root / rel), pre_skip=pre))
    # Loose files at the top level have no class: report them, do not guess one.
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.is_file():
            split = split_of("", e.name, e.name)
            skip = Skip(e.name, "no-class-folder", "file is not inside a class folder")
            if split is None:
                unassigned.append(skip)
            else:
                items.append(Item(e.name, split, pre_skip=(skip.reason, skip.detail), path=e.path))
    if split_map is not None:
        index = {c: i for i, c in enumerate(folders)}
        for (cls, name), split in sorted(split_map.items()):
            if (cls, name) not in seen:
                rel = f"{cls}/{name}"
                label = index.get(cls)
                items.append(Item(rel, split, label=label, classname=names[label] if label is not None else None,
                                  pre_skip=("missing-file", "listed in the split file, not on disk")))
    return Listing(items, unassigned, classnames=names, templates=list(opts.templates),
                   info={"class_folders": folders, "classname_origin": origin})
