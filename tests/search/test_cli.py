"""python -m search: --help examples, the four commands' output, and one clear line per bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from search.cli import main
from tests.search.util import MODEL, build_collection

from tests import REPO_ROOT as ROOT


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search_cli")
    folders = build_collection(root / "shards")
    out = root / "idx"
    assert main(["index", "--model", MODEL, "--shards", str(folders[1]), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    return out


def error_line(capsys) -> str:
    """The one line a failed command printed on stderr (asserting it is one line, no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_help_shows_examples(capsys):
    out = subprocess.run([sys.executable, "-m", "search", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert all(f"python -m search {cmd}" in out for cmd in ["index", "query", "locate", "serve"])
    for cmd in ["index", "query", "locate", "serve"]:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "example" in out and f"python -m search {cmd}" in out


def test_index_prints_summary_and_query_prints_table_json_and_grid(index_dir, capsys, tmp_path):
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["count"] == 24
    key = json.loads((index_dir / "items.jsonl").read_text().splitlines()[3])["key"]
    capsys.readouterr()
    assert main(["query", str(index_dir), "--key", key, "-k", "4", "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {tmp_path / 'g.png'}" and out[1] == f"key {key}: top 4 of 24 (flat index)"
    assert out[2].split() == ["#", "score", "key", "class", "caption"]
    assert out[3].split()[:3] == ["1", "1.000", key] and len(out) == 7
    with Image.open(tmp_path / "g.png") as im:
        assert im.width >= 4 * 170 - 1
    assert main(["query", str(index_dir), "--text", "an airport", "--json", "-k", "3"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["query"]["text"] == "an airport" and [r["rank"] for r in payload["results"]] == [1, 2, 3]
    assert {"key", "score", "caption", "captions", "label", "classname"} <= set(payload["results"][0])


def test_image_query_of_an_indexed_image_file_finds_it_first(index_dir, capsys, tmp_path):
    from search.store import SearchIndex

    index = SearchIndex(index_dir)
    (tmp_path / "q.jpg").write_bytes(index.image_bytes(7))
    capsys.readouterr()
    assert main(["query", str(index_dir), "--image", str(tmp_path / "q.jpg"), "--json", "-k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["uid"] == index.items[7]["uid"]


def test_bad_query_input_is_one_clear_line(index_dir, capsys, tmp_path):
    idx = str(index_dir)
    (tmp_path / "notimage.jpg").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = [
        (["query", idx, "--text", "   "], 'error: empty query: --text needs some words, e.g. --text "baseball field"'),
        (["query", idx], "error: give exactly one of --text, --image or --key"),
        (["query", idx, "--text", "a", "--key", "b"], "error: give exactly one of --text, --image or --key (got --text, --key)"),
        (["query", idx, "--key", "nope"], f"error: unknown key 'nope': not in index {idx} (24 items)"),
        (["query", idx, "--image", str(tmp_path / "missing.jpg")], f"error: query image not found: {tmp_path / 'missing.jpg'}"),
        (["query", idx, "--image", str(tmp_path / "notimage.jpg")],
         f"error: cannot read query image {tmp_path / 'notimage.jpg'}: not an image format PIL can decode "
         "(JPEG, PNG, TIFF, WebP ...)"),
        (["query", idx, "--image", str(tmp_path / "empty.png")], f"error: query image {tmp_path / 'empty.png'} is empty (0 bytes)"),
        (["query", str(tmp_path / "noindex"), "--text", "x"],
         f"error: index not found: {tmp_path / 'noindex'} (build one with `python -m search index`)"),
        (["query", str(tmp_path), "--text", "x"],
         f"error: {tmp_path} is not a search index: index.faiss, vectors.npy, items.jsonl, meta.json missing"),
        (["query", idx, "--text", "x", "-k", "0"], "error: --k must be >= 1, got 0"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert error_line(capsys) == expected


def test_model_mismatch_is_one_clear_line(index_dir, capsys):
    capsys.readouterr()
    assert main(["query", str(index_dir), "--text", "a beach", "--model", "orbit-micro"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: model mismatch: index {index_dir} was built with orbit-tiny (orbit-tiny, digest ")
    assert "but orbit-micro is orbit-micro with digest" in line and "rebuild it with" in line
    assert main(["query", str(index_dir), "--text", "a beach", "--model", "no-such-arch"]) == 2
    assert error_line(capsys).startswith("error: cannot load model 'no-such-arch': ")


def test_bad_index_and_locate_input_is_one_clear_line(index_dir, capsys, tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (200, 150), "green").save(small)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    cases = [
        (["index", "--model", MODEL, "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "i")],
         f"error: shard folder not found: {tmp_path / 'nope'}"),
        (["index", "--model", MODEL, "--shards", str(tmp_path), "--out", str(index_dir)],
         f"error: --out {index_dir} is not empty; pass --overwrite to replace the index there"),
        (["locate", "--model", MODEL, "--image", str(small), "--text", "a lake", "--out", str(tmp_path / "o")],
         "error: scene small.png is 200x150 px, smaller than one 224 px tile; use --tile 150 or less"),
        (["locate", "--model", MODEL, "--image", str(tmp_path / "none.tif"), "--text", "x", "--out", str(tmp_path)],
         f"error: scene not found: {tmp_path / 'none.tif'}"),
        (["locate", "--model", MODEL, "--image", str(small), "--text", " ", "--out", str(tmp_path)],
         'error: empty query: --text needs some words, e.g. --text "storage tanks"'),
        (["locate", "--model", MODEL, "--image", str(small), "--text", "x", "--tile", "64", "--stride", "100",
          "--out", str(tmp_path)], "error: --stride 100 is larger than --tile 64: parts of the scene would never be scored"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert error_line(capsys) == expected
    assert main(["locate", "--model", MODEL, "--image", str(tmp_path / "broken.tif"), "--text", "x",
                 "--out", str(tmp_path)]) == 2
    assert error_line(capsys).startswith(f"error: cannot read scene {tmp_path / 'broken.tif'}: ")


def test_serve_on_a_port_in_use_is_one_clear_line(index_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        capsys.readouterr()
        assert main(["serve", str(index_dir), "--port", str(port), "--device", "cpu"]) == 2
        assert error_line(capsys) == f"error: port {port} on 127.0.0.1 is in use; pick another with --port"


def test_locate_cli_prints_the_ranked_tiles(capsys, tmp_path):
    scene = tmp_path / "scene.png"
    Image.effect_mandelbrot((256, 192), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(scene)
    assert main(["locate", "--model", MODEL, "--image", str(scene), "--text", "a swirl", "--tile", "128",
                 "--out", str(tmp_path / "o"), "--top", "3", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == '"a swirl" in scene.png (256x192 px, not georeferenced): 6 tiles of 128 px, stride 64'
    assert out[1].split() == ["#", "score", "x", "y", "size"] and len(out) == 2 + 3 + 3  # header, 3 tiles, 3 files
