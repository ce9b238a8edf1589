"""Build orchestration: list -> process (in order, optionally in parallel) -> dedup -> write."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from shards import BUILDER_VERSION
from shards.items import Item, Listing, Skip
from shards.keys import assign_keys
from shards.options import BuildOptions
from shards.sources import SOURCES
from shards.splits import check_fractions, split_order
from shards.worker import ImageOptions, ItemProcessor, Result
from shards.writer import SplitShardWriter


def write_json(path: Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys, fixed indent, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that already holds shards, unless ``overwrite``.

    With ``overwrite`` only what a build writes is removed (split folders with
    shards, ``manifest.json``); other files stay.

    Raises:
        FileExistsError: when shards or a manifest are present and not ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    old = sorted(out.glob("*/*.tar")) + ([out / "manifest.json"] if (out / "manifest.json").exists() else [])
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({old[0].name}, ...); pass --overwrite to replace them")
    for p in old:
        p.unlink()
    for d in {p.parent for p in old if p.suffix == ".tar"}:
        for name in ("stats.json", "sizes.json"):
            (d / name).unlink(missing_ok=True)
        if not any(d.iterdir()):
            shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)


@contextmanager
def _mapper(workers: int) -> Iterator[Any]:
    """``map(fn, items)`` that keeps input order: in-process, or ``Pool.imap``."""
    if workers <= 1:
        yield lambda fn, items: map(fn, items)
        return
    methods = mp.get_all_start_methods()
    # fork avoids re-importing numpy/PIL in every worker; results do not depend on it.
    ctx = mp.get_context("fork" if "fork" in methods else methods[0])
    with ctx.Pool(workers) as pool:
        yield lambda fn, items: pool.imap(fn, items, chunksize=max(1, min(32, len(items) // (workers * 8) or 1)))


class _SplitRun:
    """Counters and writer for one split."""

    def __init__(self, out: Path, split: str, opts: BuildOptions) -> None:
        self.split = split
        self.writer = SplitShardWriter(out / split, split, opts.shard_size, opts.shard_bytes)
        self.skips: list[Skip] = []
        self.classes: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.leaks: list[dict[str, str]] = []
        self.inputs = 0
        self.written = 0
        self.passthrough = 0

    def stats(self) -> dict[str, Any]:
        sizes = self.writer.close()
        return {
            "split": self.split, "inputs": self.inputs, "written": self.written, "skipped": len(self.skips),
            "skipped_reasons": dict(sorted(Counter(s.reason for s in self.skips).items())),
            "skipped_items": [s.as_dict() for s in self.skips],
            "dropped_captions": dict(sorted(self.dropped.items())),
            "leaks": self.leaks, "classes": dict(sorted(self.classes.items())), "shards": len(sizes),
        }, sizes


def _consume(run: _SplitRun, results: Iterator[Result], seen: dict[str, tuple[str, str]],
             opts: BuildOptions, bar: tqdm) -> None:
    for res in results:
        bar.update(1)
        item = res.item
        run.inputs += 1
        run.dropped.update(item.dropped_captions)
        if res.members is None:
            run.skips.append(Skip(item.source, res.reason, res.detail))
            continue
        first = seen.get(res.digest) if opts.dedup else None
        if first is not None and first[0] == run.split:
            run.skips.append(Skip(item.source, "duplicate", f"same pixels as {first[1]}"))
            continue
        if first is not None:
            leak = {"source": item.source, "also_in": first[0], "other": first[1]}
            if opts.drop_leaks:
                run.skips.append(Skip(item.source, "leak", f"same pixels as {first[0]}:{first[1]}"))
                continue
            run.leaks.append(leak)
        else:
            seen[res.digest] = (run.split, item.source)
        run.writer.write(item.key, res.members)
        run.written += 1
        run.classes[item.classname if item.classname is not None else str(item.label)] += 1


def build_listing(listing: Listing, source: str, input_path: str | None, out: Path,
                  opts: BuildOptions) -> dict[str, Any]:
    """Write the shards, stats and manifest for an already listed input."""
    items = sorted(listing.items, key=lambda it: (it.source, it.split))
    keys = assign_keys([it.source for it in items])
    by_split: dict[str, list[Item]] = {}
    for it, key in zip(items, keys):
        by_split.setdefault(it.split, []).append(it.with_key(key))
    image_opts = ImageOptions(opts.resize, opts.jpeg_quality, opts.seed, opts.image_size)
    processor = ItemProcessor(image_opts)
    seen: dict[str, tuple[str, str]] = {}
    split_stats: dict[str, dict[str, Any]] = {}
    with _mapper(opts.workers) as imap, tqdm(total=len(items), desc=f"shards {source}", unit="img",
                                             disable=not opts.progress, dynamic_ncols=True) as bar:
        for split in split_order(set(by_split)):
            bar.set_postfix_str(split)
            run = _SplitRun(out, split, opts)
            _consume(run, imap(processor, by_split[split]), seen, opts, bar)
            stats, sizes = run.stats()
            (out / split).mkdir(parents=True, exist_ok=True)
            write_json(out / split / "stats.json", stats)
            write_json(out / split / "sizes.json", sizes)
            split_stats[split] = stats
    manifest = {
        "builder": "orbitclip-shards", "builder_version": BUILDER_VERSION, "source": source,
        "input": None if input_path is None else str(input_path),
        "classnames": listing.classnames, "templates": listing.templates, "source_info": listing.info,
        "splits": {s: {k: st[k] for k in ("inputs", "written", "skipped", "skipped_reasons", "classes", "shards")}
                   | {"leaks": len(st["leaks"])} for s, st in split_stats.items()},
        "unassigned": {"count": len(listing.unassigned),
                       "reasons": dict(sorted(Counter(s.reason for s in listing.unassigned).items())),
                       "items": [s.as_dict() for s in listing.unassigned]},
        "options": opts.recorded(),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def build(source: str, input_path: str | None, output: str | Path, opts: BuildOptions) -> dict[str, Any]:
    """List ``input_path`` with ``source`` and write shards to ``output``; return the manifest."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")
    if source != "synthetic" and not input_path:
        raise ValueError(f"source {source!r} needs an input path")
    check_fractions(*opts.fractions(source))
    out = Path(output)
    if not opts.overwrite:
        prepare_output(out, overwrite=False)  # refuse early, before a long listing
    listing = SOURCES[source](input_path, opts)  # list before deleting: a bad input must not wipe old shards
    prepare_output(out, opts.overwrite)
    return build_listing(listing, source, input_path, out, opts)
