"""Shard builder: karpathy and csv sources (captions, labels, bad text), and the synthetic source."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from shards import api
from shards.synthetic import CLASSNAMES, TEMPLATES, render_scene
from tests.shards.helpers import image_bytes, read_split, rgb_image, stats, write

Q = {"progress": False}


def _karpathy(tmp_path):
    img = tmp_path / "imgs"
    for i in range(6):
        write(img / f"{i}.jpg", image_bytes(rgb_image(i), "JPEG"))
    write(img / "weird.name.tif", image_bytes(rgb_image(50), "TIFF"))
    sent = lambda *raws: [{"raw": r, "tokens": []} for r in raws]  # noqa: E731
    entries = [
        {"filename": "0.jpg", "split": "train", "label": "Port", "sentences": sent("a port .", "ships at a port .")},
        {"filename": "1.jpg", "split": "train", "label": "DenseResidential", "sentences": sent("houses .", "  ")},
        {"filename": "2.jpg", "split": "val", "label": "Port", "sentences": sent("boats .")},
        {"filename": "3.jpg", "split": "test", "sentences": sent("a field .")},
        {"filename": "4.jpg", "split": "restval", "sentences": sent("a road .")},
        {"filename": "5.jpg", "split": "train", "sentences": sent("", " \t")},           # no caption left
        {"filename": "missing.jpg", "split": "val", "sentences": sent("ghost .")},       # missing file
        {"filename": "weird.name.tif", "split": "train", "sentences": sent("BAD_CAPTION", "a tiff .")},
        {"split": "train", "sentences": sent("no file name .")},                       # bad entry
    ]
    text = json.dumps({"images": entries})
    # One caption holds Latin-1 bytes: it is dropped as non-utf8, the image keeps its other caption.
    data = text.encode("utf-8").replace(b"BAD_CAPTION", b"caf\xe9 ")
    (tmp_path / "ds.json").write_bytes(data)
    return tmp_path / "ds.json", img


def test_karpathy_source_splits_labels_captions(tmp_path):
    js, img = _karpathy(tmp_path)
    m = api.build("karpathy", js, tmp_path / "out", images=str(img), **Q)
    assert m["classnames"] == ["DenseResidential", "Port"]
    assert m["source_info"]["readable_classnames"] == ["dense residential area", "port"]
    assert {s: v["written"] for s, v in m["splits"].items()} == {"train": 3, "val": 1, "test": 1, "restval": 1}
    assert stats(tmp_path / "out", "train")["skipped_reasons"] == {"no-caption": 1}
    assert stats(tmp_path / "out", "train")["dropped_captions"] == {"empty": 3, "non-utf8": 1}
    assert stats(tmp_path / "out", "val")["skipped_reasons"] == {"missing-file": 1}
    assert m["unassigned"]["reasons"] == {"bad-entry": 1}
    train = {s["json"]["source"]: s for s in read_split(tmp_path / "out", "train")}
    assert train["0.jpg"]["json"]["captions"] == ["a port .", "ships at a port ."]
    assert train["0.jpg"]["txt"] == "a port ."
    assert (train["0.jpg"]["json"]["label"], train["0.jpg"]["json"]["classname"]) == (1, "Port")
    assert train["1.jpg"]["json"]["captions"] == ["houses ."]
    assert train["weird.name.tif"]["json"]["captions"] == ["a tiff ."] and "." not in train["weird.name.tif"]["key"]
    test = read_split(tmp_path / "out", "test")
    assert test[0]["json"]["label"] is None and test[0]["json"]["classname"] is None
    for split in m["splits"]:
        st = stats(tmp_path / "out", split)
        assert st["inputs"] == st["written"] + st["skipped"]


def test_csv_source_groups_rows_and_skips_bad_rows(tmp_path):
    img = tmp_path / "imgs"
    for i in range(4):
        write(img / "sub" / f"{i}.png", image_bytes(rgb_image(i), "PNG"))
    rows = [
        "path;text;part;cls",
        "sub/0.png;a lake .;train;water",
        "sub/0.png;a blue lake .;train;water",
        "sub/1.png;a forest .;val;trees",
        "sub/2.png;BAD;train;trees",          # only row of 2.png is not UTF-8 -> non-utf8
        "sub/3.png;fields .;train;crops",
        "sub/3.png;BAD;train;crops",          # second row of 3.png dropped, image kept
        "sub/9.png;nothing here .;test;crops",  # missing file
        "BADPATH;x;train;crops",              # undecodable path: a rejected row of its split
    ]
    data = "\n".join(rows).encode().replace(b"BAD", b"\xff\xfe bad")
    (tmp_path / "t.csv").write_bytes(data)
    m = api.build("csv", tmp_path / "t.csv", tmp_path / "out", images=str(img), image_column="path",
                  caption_column="text", separator=";", split_column="part", label_column="cls", **Q)
    assert m["classnames"] == ["crops", "trees", "water"]
    assert {s: v["written"] for s, v in m["splits"].items()} == {"train": 2, "val": 1, "test": 0}
    assert stats(tmp_path / "out", "train")["skipped_reasons"] == {"non-utf8": 2}
    assert stats(tmp_path / "out", "train")["dropped_captions"] == {"non-utf8": 2}
    assert stats(tmp_path / "out", "test")["skipped_reasons"] == {"missing-file": 1}
    train = {s["json"]["source"]: s["json"] for s in read_split(tmp_path / "out", "train")}
    assert train["sub/0.png"]["captions"] == ["a lake .", "a blue lake ."] and train["sub/0.png"]["label"] == 2
    assert train["sub/3.png"]["captions"] == ["fields ."]
    with pytest.raises(ValueError, match="column 'caption' not in header"):
        api.build("csv", tmp_path / "t.csv", tmp_path / "o2", separator=";", image_column="path", **Q)


def test_synthetic_scenes_are_pure_labelled_and_described():
    a, b = render_scene(7, seed=3), render_scene(7, seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.captions == b.captions
    assert render_scene(7, seed=4).image.tobytes() != a.image.tobytes()
    assert a.image.mode == "RGB" and a.image.size == (64, 64) and render_scene(1, size=32).image.size == (32, 32)
    assert len(CLASSNAMES) == 10 and all("{}" in t for t in TEMPLATES)
    # The class is recoverable from every caption: exactly one class's keywords match.
    words = [("lake",), ("farmland", "crop fields", "agricultural"), ("residential", "houses", "neighbourhood"),
             ("river",), ("harbor", "port"), ("interchange", "highways crossing", "junction"), ("desert", "dunes"),
             ("forest canopy", "a dense forest", "covered by trees", "view of a forest(?! lake)"), ("beach",),
             ("airport", "runway", "airfield")]
    means = []
    for i in range(60):
        s = render_scene(i)
        assert s.label == i % 10 and s.classname == CLASSNAMES[s.label] and len(set(s.captions)) == 3
        for cap in s.captions:
            hits = [k for k, ws in enumerate(words) if any(re.search(rf"\b{w}\b", cap) for w in ws)]
            assert hits == [s.label], (cap, hits)
        means.append(np.asarray(s.image, dtype=np.float32).reshape(-1, 3).mean(0))
    # Classes look different: class-mean colours are far apart compared with pixel noise.
    cm = np.stack([np.mean(means[k::10], axis=0) for k in range(10)])
    dists = np.linalg.norm(cm[:, None] - cm[None], axis=-1)[np.triu_indices(10, 1)]
    assert np.sort(dists)[len(dists) // 2] > 15


def test_synthetic_render_speed():
    render_scene(0)
    # CPU time of this process, not wall time: the test machine's cores are shared.
    t, n = time.process_time(), 300
    for i in range(n):
        render_scene(i)
    rate = n / (time.process_time() - t)
    # Target is >= 1000/s; the bound leaves some room for cache contention.
    assert rate > 600, f"{rate:.0f} scenes/s"


def test_synthetic_source_build(tmp_path):
    m = api.build("synthetic", None, tmp_path / "out", count=60, seed=1, **Q)
    assert set(m["splits"]) == {"train", "val", "test"}
    assert sum(v["written"] for v in m["splits"].values()) == 60 and m["classnames"] == CLASSNAMES
    s = read_split(tmp_path / "out", "val")[0]
    ref = render_scene(int(s["json"]["source"].split("/")[1]), seed=1)
    assert s["json"]["captions"] == ref.captions and s["json"]["label"] == ref.label
    assert np.abs(np.asarray(s["image"], np.int16) - np.asarray(ref.image, np.int16)).mean() < 6
