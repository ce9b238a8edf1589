"""Shard builder on the real data in ../shared/data (skips where it is absent)."""

from __future__ import annotations

import json

import pytest

from shards import api
from shards.options import make_options
from shards.sources import SOURCES
from tests.shards.helpers import read_split, stats

pytestmark = pytest.mark.data
Q = {"progress": False}


def test_eurosat_listing_and_subsample_build(shared_data, tmp_path):
    root = shared_data / "eurosat_rgb"
    listing = SOURCES["folder"](str(root), make_options({}))
    assert len(listing.items) == 4000 and not listing.unassigned
    assert {it.split for it in listing.items} == {"train"}
    assert listing.classnames[:3] == ["annual crop land", "forest", "brushland or shrubland"]
    assert listing.classnames[9] == "lake or sea" and len(listing.classnames) == 10
    # Full build is measured by hand (see report); here 20 images per class via symlinks.
    sub = tmp_path / "eurosat"
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        (sub / cls).mkdir(parents=True)
        for f in sorted((root / cls).iterdir())[:20]:
            (sub / cls / f.name).symlink_to(f)
    m = api.build("folder", sub, tmp_path / "out", workers=2, **Q)
    assert m["splits"]["train"]["written"] == 200 and m["splits"]["train"]["skipped"] == 0
    assert set(m["splits"]["train"]["classes"].values()) == {20}
    assert api.inspect(tmp_path / "out")["ok"]


def test_ucm_captions_counts(shared_data, tmp_path):
    ucm = shared_data / "ucm_captions"
    opts = make_options({"images": str(ucm / "images")})
    listing = SOURCES["karpathy"](str(ucm / "dataset.json"), opts)
    by_split = {s: [it for it in listing.items if it.split == s] for s in ("train", "val")}
    assert (len(by_split["train"]), len(by_split["val"])) == (1680, 210)
    assert all(len(it.captions) == 5 for it in listing.items)
    # Build the first 120 entries (includes 102.jpg/103.jpg, pixel-identical in the original data).
    data = json.loads((ucm / "dataset.json").read_text())
    data["images"] = [e for e in data["images"] if int(e["filename"].split(".")[0]) <= 120]
    (tmp_path / "ucm.json").write_text(json.dumps(data))
    m = api.build("karpathy", tmp_path / "ucm.json", tmp_path / "out", images=str(ucm / "images"), **Q)
    n = {s: sum(1 for e in data["images"] if e["split"] == s) for s in ("train", "val")}
    assert m["splits"]["train"]["skipped_reasons"] == {"duplicate": 1}
    assert m["splits"]["train"]["written"] == n["train"] - 1 and m["splits"]["val"]["written"] == n["val"]
    assert all(len(s["json"]["captions"]) == 5 for s in read_split(tmp_path / "out", "val"))


def test_rsicd_full_build(shared_data, tmp_path):
    rs = shared_data / "rsicd"
    m = api.build("karpathy", rs / "dataset_rsicd.json", tmp_path / "out", images=str(rs / "images"), workers=2, **Q)
    assert {s: (v["written"], v["skipped"]) for s, v in m["splits"].items()} == {"train": (300, 0), "val": (200, 0)}
    assert "DenseResidential" in m["classnames"] and m["classnames"] == sorted(m["classnames"])
    val = read_split(tmp_path / "out", "val")
    assert all(len(s["json"]["captions"]) == 5 and s["json"]["classname"] in m["classnames"] for s in val)
    assert all(m["classnames"][s["json"]["label"]] == s["json"]["classname"] for s in val)
    st = stats(tmp_path / "out", "train")
    assert st["inputs"] == 300 == st["written"]
