"""Load one split of a benchmark into an :class:`EvalDataset`.

Raw data (class folders, Karpathy JSON, CSV) is built into shards once through
``shards.api.build`` and cached under ``$ORBITCLIP_CACHE`` (default
``.cache/eval-data`` in the checkout, or in the current directory when installed), keyed by a hash of the source and build options.
Shards are read with webdataset; ``kind: synthetic`` renders scenes directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds

import configs
from eval.benchmark import BenchmarkSpec, DataSpec
from eval.dataset import EvalDataset


class DataUnavailable(RuntimeError):
    """The benchmark's data is not on this machine (the runner skips it)."""


def cache_root() -> Path:
    """Where built benchmark shards are cached."""
    env = os.environ.get("ORBITCLIP_CACHE")
    return Path(env).expanduser() if env else configs.project_root() / ".cache" / "eval-data"


def norm(name: str) -> str:
    """Class-name matching key: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _check_karpathy_split(spec: BenchmarkSpec, src: Path) -> None:
    # Held-out test splits are often absent: say so before building the whole JSON's shards.
    try:
        splits = {str(im.get("split")) for im in json.loads(src.read_text(encoding="utf-8")).get("images", [])}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"benchmark {spec.name}: {src} is not a Karpathy caption JSON: {e}") from None
    wanted = spec.data.split
    if wanted not in splits:
        raise DataUnavailable(f"benchmark {spec.name}: split {wanted!r} not in {src} (it has {sorted(splits)})")


def ensure_shards(spec: BenchmarkSpec) -> Path:
    """The shards folder of a benchmark, building (and caching) it if the source is raw."""
    data = spec.data
    src = data.resolve(data.path)
    if not src.exists():
        raise DataUnavailable(f"benchmark {spec.name}: data not found at {src} "
                              f"(relative paths resolve against $ORBITCLIP_DATA or ../shared/data)")
    if data.kind == "shards":
        return src
    if data.kind == "karpathy":
        _check_karpathy_split(spec, src)
    options = dict(data.build)
    if data.images:
        images = data.resolve(data.images)
        if not images.is_dir():
            raise DataUnavailable(f"benchmark {spec.name}: image folder not found at {images}")
        options["images"] = str(images)
    # keyed by source and options, not by benchmark name: benchmarks sharing data share the build
    from shards import BUILDER_VERSION

    out = cache_root() / f"{src.stem}-{data.kind}-{_digest([data.kind, str(src), options, BUILDER_VERSION])}"
    if (out / "manifest.json").is_file():
        return out
    from shards import api as shards_api

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f"[eval] building benchmark data {spec.name} from {src} -> {out}", flush=True)
    shards_api.build(data.kind, str(src), str(tmp), progress=False, **options)
    try:
        tmp.rename(out)  # atomic: a half-built cache is never mistaken for a finished one
    except OSError:
        if not (out / "manifest.json").is_file():  # not a concurrent builder winning the race
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _count_errors(counter: Counter) -> Any:
    def handler(exn: Exception) -> bool:
        counter[f"unreadable sample: {type(exn).__name__}"] += 1
        return True  # keep going; the count is reported
    return handler


def _read_shards(folder: Path, split: str, excluded: Counter) -> Iterator[tuple[bytes, dict]]:
    split_dir = folder / split
    tars = sorted(split_dir.glob("*.tar"))
    if not tars:
        have = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        raise DataUnavailable(f"no shards for split {split!r} in {folder} (splits there: {have})")
    stats = split_dir / "stats.json"
    if stats.is_file():  # inputs the builder could not use are reported, not silently lost
        for reason, n in (json.loads(stats.read_text()).get("skipped_reasons") or {}).items():
            excluded[f"skipped by shards build: {reason}"] += int(n)
    ds = wds.WebDataset([str(t) for t in tars], shardshuffle=False, nodesplitter=None,
                        workersplitter=None, empty_check=False, handler=_count_errors(excluded))
    for sample in ds:
        img = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
        if img is None or "json" not in sample:
            excluded["sample without image or json"] += 1
            continue
        meta = json.loads(sample["json"])
        if not meta.get("captions"):
            txt = sample.get("txt")
            meta["captions"] = [txt.decode("utf-8")] if txt else []
        yield img, meta


def _synthetic(data: DataSpec) -> tuple[list[Any], list[dict], list[str], list[str]]:
    from shards import synthetic

    images, metas = [], []
    for i in range(data.count):
        s = synthetic.render_scene(i, seed=data.seed, size=data.image_size)
        images.append(s.image)
        metas.append({"captions": list(s.captions), "label": s.label, "classname": s.classname,
                      "source": f"synthetic/seed{data.seed}/{i}"})
    return images, metas, list(synthetic.CLASSNAMES), list(synthetic.TEMPLATES)


class _Labeler:
    """Maps a sample's class (name or integer label) to the benchmark's class index."""

    def __init__(self, spec: BenchmarkSpec, dataset_classnames: list[str] | None) -> None:
        self.spec = spec
        self.dataset_classnames = dataset_classnames
        if spec.classes is None:
            if not dataset_classnames:
                self.classnames = None
            else:
                self.classnames = list(dataset_classnames)
            self.lookup: dict[str, int] = {}
        else:
            self.classnames = spec.classnames
            items = spec.classes.items() if isinstance(spec.classes, dict) else [(c, c) for c in spec.classes]
            self.lookup = {}
            self.keys = []
            for idx, (key, value) in enumerate(items):
                self.lookup.setdefault(norm(key), idx)
                self.lookup.setdefault(norm(value), idx)
                self.keys.append(norm(key))

    def __call__(self, meta: dict, excluded: Counter) -> int | None:
        name, label = meta.get("classname"), meta.get("label")
        if name is None and isinstance(label, int) and self.dataset_classnames:
            if 0 <= label < len(self.dataset_classnames):
                name = self.dataset_classnames[label]
        if self.spec.classes is None:
            return label if isinstance(label, int) and self.classnames else None
        if name is None:
            return None
        idx = self.lookup.get(norm(str(name)))
        if idx is None:
            excluded[f"class not in benchmark list: {name}"] += 1
            return None
        if self.spec.data.filter == "filename_names_class":
            stem = Path(str(meta.get("source", ""))).name
            m = re.match(r"[A-Za-z]+", stem)
            if not m or norm(m.group(0)) != self.keys[idx]:
                excluded["file name names no class (RSICD-30 protocol)"] += 1
                return None
        return idx


def load_split(spec: BenchmarkSpec, split: str | None = None) -> EvalDataset:
    """Load ``split`` (default: the benchmark's ``data.split``) of a benchmark.

    Raises:
        DataUnavailable: the data (or the split) is not on this machine.
    """
    data = spec.data
    split = split or data.split
    excluded: Counter = Counter()
    if data.kind == "synthetic":
        images, metas, ds_classes, ds_templates = _synthetic(data)
    else:
        folder = ensure_shards(spec)
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        ds_classes, ds_templates = manifest.get("classnames"), manifest.get("templates")
        images, metas = [], []
        for img, meta in _read_shards(folder, split, excluded):
            images.append(img)
            metas.append(meta)
    if data.max_samples is not None and len(images) > data.max_samples:
        # evenly spaced, not the first N: class-sorted data would give one class only
        step = len(images) / data.max_samples
        keep = [int(i * step) for i in range(data.max_samples)]
        images, metas = [images[i] for i in keep], [metas[i] for i in keep]
    labeler = _Labeler(spec, ds_classes)
    labels = [labeler(m, excluded) for m in metas]
    key = f"{spec.name}/{split}/{_digest([data.__dict__, split])}"
    return EvalDataset(
        key=key, images=images, captions=[list(m.get("captions") or []) for m in metas], labels=labels,
        classnames=labeler.classnames, templates=list(spec.templates or ds_templates or []) or None,
        sources=[str(m.get("source", "")) for m in metas], excluded=dict(excluded),
    )
