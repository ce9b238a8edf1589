"""Shard builder: folder source, bad-input matrix, splits, determinism, writer, inspect, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import api
from shards.cli import main as cli_main
from shards.keys import assign_keys
from shards.splits import hash_split
from tests.shards.helpers import (
    four_band_tiff, image_bytes, read_split, rgb_image, stats, tree_bytes, write,
)

Q = {"progress": False}


def _eurosat_like(root: Path) -> dict[str, bytes]:
    """Two EuroSAT class folders with a JPEG, a PNG and a TIFF each."""
    files = {}
    for c, cls in enumerate(["AnnualCrop", "SeaLake"]):
        for k, (ext, fmt) in enumerate([("jpg", "JPEG"), ("png", "PNG"), ("tif", "TIFF")]):
            data = image_bytes(rgb_image(10 * c + k), fmt)
            write(root / cls / f"{cls}_{k}.{ext}", data)
            files[f"{cls}/{cls}_{k}.{ext}"] = data
    return files


def test_folder_source_eurosat_names_templates_and_roundtrip(tmp_path):
    files = _eurosat_like(tmp_path / "in")
    templates = ["a satellite photo of {}.", "an aerial view of {}."]
    m = api.build("folder", tmp_path / "in", tmp_path / "out", templates=templates, **Q)
    assert m["classnames"] == ["annual crop land", "lake or sea"]
    assert m["templates"] == templates and m["source_info"]["classname_origin"] == "eurosat"
    assert m["splits"]["train"]["written"] == 6 and list(m["splits"]) == ["train"]
    samples = read_split(tmp_path / "out", "train")
    assert len(samples) == 6
    for s in samples:
        meta = s["json"]
        assert "." not in s["key"] and meta["key"] == s["key"]
        assert meta["captions"] == [t.format(meta["classname"]) for t in templates]
        assert s["txt"] == meta["captions"][0]
        assert meta["label"] == ["annual crop land", "lake or sea"].index(meta["classname"])
        assert s["image"].mode == "RGB" and s["image"].size == (32, 32)
    # A valid RGB JPEG is stored unchanged; PNG/TIFF are re-encoded.
    tar_bytes = b"".join(p.read_bytes() for p in (tmp_path / "out" / "train").glob("*.tar"))
    assert files["AnnualCrop/AnnualCrop_0.jpg"] in tar_bytes
    assert files["AnnualCrop/AnnualCrop_1.png"] not in tar_bytes
    sizes = json.loads((tmp_path / "out" / "train" / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 6}


def test_generic_names_and_mapping_file(tmp_path):
    for i, cls in enumerate(["storage_tanks", "BareLandPatch", "harbor"]):
        write(tmp_path / "in" / cls / "x.png", image_bytes(rgb_image(i), "PNG"))
    (tmp_path / "map.json").write_text(json.dumps({"harbor": "a harbour"}))
    m = api.build("folder", tmp_path / "in", tmp_path / "out", class_map=str(tmp_path / "map.json"), **Q)
    assert m["classnames"] == ["bare land patch", "a harbour", "storage tanks"]
    with pytest.raises(ValueError, match="not a eurosat class"):
        api.build("folder", tmp_path / "in", tmp_path / "o2", dataset="eurosat", **Q)


def _bad_inputs(root: Path) -> None:
    """One class folder holding every kind of problem input, with known outcomes."""
    d = root / "Forest"
    img = rgb_image(1)
    write(d / "good.jpg", image_bytes(img, "JPEG"))
    write(d / "same_as_good.png", image_bytes(Image.open(d / "good.jpg"), "PNG"))   # duplicate pixels
    write(d / "zero.jpg", b"")                                                        # empty-file
    write(d / "trunc.png", image_bytes(rgb_image(2), "PNG")[:150])                    # truncated-image
    write(d / "garbage.jpg", b"this is not an image at all")                         # unreadable-image
    write(d / "cmyk.jpg", image_bytes(rgb_image(3).convert("CMYK"), "JPEG"))          # converted
    write(d / "palette.png", image_bytes(rgb_image(4).convert("P"), "PNG"))           # converted
    g16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    write(d / "gray16.png", image_bytes(Image.fromarray(g16), "PNG"))                 # scaled to 8 bit
    write(d / "opaque.png", image_bytes(rgb_image(5).convert("RGBA"), "PNG"))         # converted
    see_through = rgb_image(6).convert("RGBA")
    see_through.putalpha(100)
    write(d / "transparent.png", image_bytes(see_through, "PNG"))                    # transparency
    write(d / "nir.tif", four_band_tiff(7))                                           # multiband
    write(d / "scene.v2.final.jpg", image_bytes(rgb_image(8), "JPEG"))               # dotted name
    write(d / "scene_v2_final.png", image_bytes(rgb_image(9), "PNG"))                # same base key
    write(d / "notes.txt", b"field notes")                                           # not-an-image
    write(root / "loose.jpg", image_bytes(rgb_image(10), "JPEG"))                    # no-class-folder


def test_bad_input_matrix_exact_counts(tmp_path):
    _bad_inputs(tmp_path / "in")
    m = api.build("folder", tmp_path / "in", tmp_path / "out", dataset="none", **Q)
    st = stats(tmp_path / "out", "train")
    assert st["skipped_reasons"] == {
        "duplicate": 1, "empty-file": 1, "truncated-image": 1, "unreadable-image": 1, "transparency": 1,
        "multiband": 1, "not-an-image": 1, "no-class-folder": 1,
    }
    assert st["inputs"] == 15 == st["written"] + st["skipped"] and st["written"] == 7
    assert {i["source"] for i in st["skipped_items"]} >= {"Forest/zero.jpg", "Forest/nir.tif", "loose.jpg"}
    assert all(i["detail"] for i in st["skipped_items"])
    samples = {s["json"]["source"]: s for s in read_split(tmp_path / "out", "train")}
    assert set(samples) == {"Forest/good.jpg", "Forest/cmyk.jpg", "Forest/palette.png", "Forest/gray16.png",
                            "Forest/opaque.png", "Forest/scene.v2.final.jpg", "Forest/scene_v2_final.png"}
    keys = [s["key"] for s in samples.values()]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    # 16-bit grey is scaled by 255/65535, not clipped: value 64*k maps to round(64*k/257).
    g = np.asarray(samples["Forest/gray16.png"]["image"].convert("L"), dtype=np.int32)
    expected = np.round(np.arange(32 * 32).reshape(32, 32) * 64 * 255 / 65535)
    assert np.abs(g - expected).max() <= 3  # JPEG error only
    assert m["splits"]["train"]["skipped"] == 8


def test_keys_are_unique_stable_and_dotless():
    srcs = ["a/b.c.jpg", "a/b_c.png", "a/b c.tif", "x.jpg", "x.jpg"]
    keys = assign_keys(srcs)
    assert len(set(keys)) == 5 and not any("." in k or "/" in k for k in keys)
    assert keys[3] != keys[4]
    # A colliding key does not depend on which other files exist.
    assert assign_keys(["a/b.c.jpg", "a/b_c.png"])[1] == keys[1]


def test_hash_split_is_stable_and_order_independent(tmp_path):
    for i in range(30):
        write(tmp_path / "in" / "River" / f"r{i}.png", image_bytes(rgb_image(i, 8), "PNG"))
    m = api.build("folder", tmp_path / "in", tmp_path / "out", val_fraction=0.3, test_fraction=0.2, **Q)
    got = {s: {x["json"]["source"] for x in read_split(tmp_path / "out", s)} for s in m["splits"]}
    assert set(got) == {"train", "val", "test"}
    for split, srcs in got.items():
        assert all(hash_split(src, 0.3, 0.2) == split for src in srcs)
    # Adding files does not move existing ones.
    write(tmp_path / "in" / "River" / "new.png", image_bytes(rgb_image(99, 8), "PNG"))
    m2 = api.build("folder", tmp_path / "in", tmp_path / "out2", val_fraction=0.3, test_fraction=0.2, **Q)
    got2 = {s: {x["json"]["source"] for x in read_split(tmp_path / "out2", s)} for s in m2["splits"]}
    assert all(got[s] <= got2[s] for s in got)


def test_split_file_missing_unlisted_and_leaks(tmp_path):
    img = image_bytes(rgb_image(1), "JPEG")
    write(tmp_path / "in" / "Beach" / "a.jpg", img)
    write(tmp_path / "in" / "Beach" / "a_copy.jpg", img)   # same image, listed in val: a leak
    write(tmp_path / "in" / "Beach" / "b.jpg", image_bytes(rgb_image(2), "JPEG"))
    write(tmp_path / "in" / "Beach" / "unlisted.jpg", image_bytes(rgb_image(3), "JPEG"))
    (tmp_path / "split.csv").write_text(
        "split,class,filename\ntrain,Beach,a.jpg\nval,Beach,a_copy.jpg\ntest,Beach,b.jpg\ntest,Beach,gone.jpg\n")
    m = api.build("folder", tmp_path / "in", tmp_path / "out", split_file=str(tmp_path / "split.csv"), **Q)
    assert {s: v["written"] for s, v in m["splits"].items()} == {"train": 1, "val": 1, "test": 1}
    assert m["splits"]["val"]["leaks"] == 1
    assert stats(tmp_path / "out", "val")["leaks"][0] == {"source": "Beach/a_copy.jpg", "also_in": "train",
                                                         "other": "Beach/a.jpg"}
    assert stats(tmp_path / "out", "test")["skipped_reasons"] == {"missing-file": 1}
    assert m["unassigned"]["reasons"] == {"not-in-split-file": 1}
    m = api.build("folder", tmp_path / "in", tmp_path / "out", split_file=str(tmp_path / "split.csv"),
                  drop_leaks=True, overwrite=True, **Q)
    assert m["splits"]["val"]["written"] == 0 and m["splits"]["val"]["skipped_reasons"] == {"leak": 1}
    assert not list((tmp_path / "out" / "val").glob("*.tar"))


def test_builds_are_byte_identical_and_worker_count_free(tmp_path):
    _bad_inputs(tmp_path / "in")
    _eurosat_like(tmp_path / "in2")
    for name, src in (("a", "in"), ("b", "in")):
        api.build("folder", tmp_path / src, tmp_path / name, dataset="none", val_fraction=0.3, shard_size=3, **Q)
    api.build("folder", tmp_path / "in", tmp_path / "c", dataset="none", val_fraction=0.3, shard_size=3,
              workers=2, **Q)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert len([k for k in a if k.endswith(".tar")]) >= 3
    assert a == b == c


def test_shard_limits_and_resize(tmp_path):
    for i in range(5):
        write(tmp_path / "in" / "Pond" / f"p{i}.png", image_bytes(rgb_image(i, 40).resize((40, 20)), "PNG"))
    m = api.build("folder", tmp_path / "in", tmp_path / "out", shard_size=2, resize=10, **Q)
    sizes = json.loads((tmp_path / "out" / "train" / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 2, "train-000001.tar": 2, "train-000002.tar": 1}
    assert all(s["image"].size == (20, 10) for s in read_split(tmp_path / "out", "train"))
    api.build("folder", tmp_path / "in", tmp_path / "out2", shard_bytes=1, **Q)
    assert len(json.loads((tmp_path / "out2" / "train" / "sizes.json").read_text())) == 5
    assert m["options"]["resize"] == 10 and "workers" not in m["options"]


def test_refuses_existing_output_and_overwrites(tmp_path):
    _eurosat_like(tmp_path / "in")
    api.build("folder", tmp_path / "in", tmp_path / "out", **Q)
    (tmp_path / "out" / "notes.md").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        api.build("folder", tmp_path / "in", tmp_path / "out", **Q)
    api.build("folder", tmp_path / "in", tmp_path / "out", overwrite=True, shard_size=4, **Q)
    assert sorted(p.name for p in (tmp_path / "out" / "train").glob("*.tar")) == ["train-000000.tar",
                                                                                 "train-000001.tar"]
    assert (tmp_path / "out" / "notes.md").read_text() == "keep me"
    with pytest.raises(TypeError, match="shard_sise"):
        api.build("folder", tmp_path / "in", tmp_path / "o3", shard_sise=3)


def test_inspect_verifies_and_draws_grid(tmp_path, capsys):
    _eurosat_like(tmp_path / "in")
    api.build("folder", tmp_path / "in", tmp_path / "out", shard_size=4, **Q)
    rep = api.inspect(tmp_path / "out", grid=tmp_path / "grid.png")
    assert rep["ok"] and rep["splits"]["train"]["samples"] == 6
    assert rep["splits"]["train"]["classes"] == {"annual crop land": 3, "lake or sea": 3}
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    # Damage: truncate one shard -> inspect reports it and the CLI fails.
    tar = tmp_path / "out" / "train" / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    rep = api.inspect(tmp_path / "out")
    assert not rep["ok"] and any("train-000001.tar" in e for e in rep["errors"])
    assert cli_main(["inspect", str(tmp_path / "out")]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_cli_build_summary_and_usage_errors(tmp_path, capsys):
    _bad_inputs(tmp_path / "in")
    rc = cli_main(["build", "--source", "folder", "--input", str(tmp_path / "in"), "--output",
                   str(tmp_path / "out"), "--dataset", "none", "--template", "a photo of {}.", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "7 written" in out and "duplicate 1" in out
    assert cli_main(["build", "--source", "folder", "--input", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "o2"), "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli_main(["build", "--source", "folder", "--input", str(tmp_path / "in"), "--output",
                     str(tmp_path / "out"), "--quiet"]) == 2
    assert "already holds shards" in capsys.readouterr().err
