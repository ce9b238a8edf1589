"""Read built shards back: counts per split and class, integrity checks, examples."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds

from shards.splits import split_order

REQUIRED = ("jpg", "txt", "json")


def _read_shard(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Samples of one tar (json parsed, jpg bytes kept) and the problems found."""
    samples, errors = [], []
    try:
        ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
        for s in ds:
            missing = [m for m in REQUIRED if m not in s]
            if missing:
                errors.append(f"{path.name}: sample {s.get('__key__')} lacks {missing}")
                continue
            try:
                meta = json.loads(s["json"])
            except ValueError as e:
                errors.append(f"{path.name}: sample {s['__key__']} has bad json ({e})")
                continue
            samples.append({"key": s["__key__"], "meta": meta, "txt": s["txt"].decode("utf-8", "replace"),
                            "jpg": s["jpg"]})
    except Exception as e:  # a damaged tar is a finding to report, not a crash
        errors.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
    return samples, errors


def _read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest; ValueError naming the file if it is not one ``shards build`` wrote."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path}: not a shards manifest (no 'splits' mapping)")
    return manifest


def inspect_shards(output: str | Path, examples: int = 3, keep_images: int = 0) -> dict[str, Any]:
    """Verify every shard under ``output`` and summarise it.

    Args:
        output: Folder written by ``shards build``.
        examples: Captions to show per split.
        keep_images: Samples (jpg bytes + caption) to return for a contact sheet.

    Returns:
        ``{"ok", "errors", "splits": {split: {"samples", "shards", "classes", "examples"}}, "images"}``.

    Raises:
        FileNotFoundError: when ``output`` has no ``manifest.json``.
        ValueError: when that file is not a manifest written by ``shards build``.
    """
    out = Path(output)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} has no manifest.json (not a shards output folder)")
    manifest = _read_manifest(out / "manifest.json")
    report: dict[str, Any] = {"ok": True, "errors": [], "splits": {}, "images": [], "source": manifest.get("source")}
    for split in split_order(list(manifest.get("splits", {}))):
        d = out / split
        sizes = json.loads((d / "sizes.json").read_text()) if (d / "sizes.json").is_file() else None
        if sizes is None:
            report["errors"].append(f"{split}: sizes.json missing")
            sizes = {}
        tars = sorted(p.name for p in d.glob("*.tar"))
        if sorted(sizes) != tars:
            report["errors"].append(f"{split}: sizes.json lists {sorted(sizes)}, folder has {tars}")
        classes: Counter[str] = Counter()
        shown: list[str] = []
        total = 0
        for name in tars:
            samples, errors = _read_shard(d / name)
            report["errors"] += errors
            if sizes.get(name) != len(samples) and not errors:
                report["errors"].append(f"{split}/{name}: {len(samples)} samples, sizes.json says {sizes.get(name)}")
            total += len(samples)
            for s in samples:
                meta = s["meta"]
                classes[str(meta.get("classname") if meta.get("classname") is not None else meta.get("label"))] += 1
                if len(shown) < examples:
                    shown.append(s["txt"])
                if len(report["images"]) < keep_images:
                    report["images"].append((s["jpg"], s["txt"], split))
        expected = manifest["splits"][split].get("written")
        if expected != total:
            report["errors"].append(f"{split}: manifest says {expected} written, shards hold {total}")
        report["splits"][split] = {"samples": total, "shards": len(tars), "classes": dict(sorted(classes.items())),
                                   "examples": shown}
    if not any(st["samples"] for st in report["splits"].values()):
        report["errors"].append("no samples in any split")  # nothing to train or evaluate on
    report["ok"] = not report["errors"]
    return report
