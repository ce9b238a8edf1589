"""Benchmarks: each script runs at tiny size on CPU and writes its JSON; their helpers are right.

No timing assertions: the numbers depend on the machine. Also covers the data hot path
the benchmarks drove (seeded plans, reduced-scale JPEG decode, in-place batch slots).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import batch_memory, data_throughput, loss_memory, train_throughput
from benchmarks.bench_data import shard_urls, synthetic_shards
from benchmarks.flops import count_flops, measure_matmul_peak, mfu
from benchmarks.openclip_ref import ensure_env
from benchmarks.openclip_train import parse_log
from benchmarks.procstats import peak_rss_bytes, reset_peak_rss, tree_cpu_seconds
from benchmarks.report import format_table
from train.data.augment import build_train_transform
from train.core.config import AugmentConfig
from train.data.decode import decode_sample, decode_sample_into

from tests import REPO_ROOT as ROOT

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """48 synthetic 64 px scenes in 3 shards (open_clip wants >= 1 shard per worker)."""
    return synthetic_shards(48, 64, shard_size=16, cache=tmp_path_factory.mktemp("bench_shards"))


@pytest.fixture(scope="module")
def ref_stack() -> None:
    """open_clip_train's side environment, or a skip when it cannot be installed here."""
    try:
        ensure_env()
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"open_clip_train side environment unavailable (needs pip + network once): {e}")


def load(path: Path) -> dict:
    payload = json.loads(path.read_text())
    assert payload["machine"]["cpu_count"] and payload["rows"]
    return payload


# -- helpers -------------------------------------------------------------------------------

def test_shard_urls_is_a_brace_pattern_over_all_tars(tiny_shards):
    pattern, count = shard_urls(tiny_shards)
    assert count == 48
    assert pattern.endswith("train/train-{000000..000002}.tar")


def test_parse_log_skips_warmup_intervals():
    lines = [f"Train Epoch: 0 [ {n}/80 (x%)] Data (t): 0.001 Batch (t): {t}, 1.0/s, 1.0/s/gpu LR: 0.1"
             for n, t in [(8, 9.0), (16, 0.5), (32, 0.25), (48, 0.25)]]
    r = parse_log("\n".join(["noise"] + lines), batch_size=8, warmup_steps=1)
    # Intervals 8->16 (1 step x 0.5 s), 16->32 and 32->48 (2 steps x 0.25 s each): 40 samples / 1.5 s.
    assert r["samples"] == 40 and r["seconds"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        parse_log("\n".join(lines), batch_size=8, warmup_steps=10)


def test_flop_count_matches_a_matmul_and_mfu():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    assert count_flops(lambda: a @ b) == 2 * 4 * 8 * 16
    assert mfu(1e12, 2.0, 4e12) == pytest.approx(0.5)
    assert 1e6 < measure_matmul_peak(torch.device("cpu"), torch.float32, n=64, iters=2) < 1e14


def test_tree_cpu_counts_children_and_peak_rss_resets():
    before = tree_cpu_seconds()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(5)"
    child = subprocess.Popen(["python3", "-c", busy])
    try:
        deadline = time.time() + 30
        while tree_cpu_seconds() - before < 0.25 and time.time() < deadline:
            time.sleep(0.05)
        assert tree_cpu_seconds() - before >= 0.25, "a live child's CPU time must be counted"
    finally:
        child.kill()
        child.wait()
    if reset_peak_rss():
        big = np.ones(40_000_000 // 8)  # ~40 MB, touched
        high = peak_rss_bytes()
        del big
        reset_peak_rss()
        assert peak_rss_bytes() < high


def test_table_shows_the_union_of_columns():
    text = format_table([{"a": 1.23456, "b": [1, 2]}, {"a": 2, "c": "x"}])
    header = text.splitlines()[0]
    assert "a" in header and "b" in header and "c" in header and "1.235" in text and "[1" not in text


def test_summarize_and_compare_use_medians_and_cpu_ratio():
    runs = {p: [{"pipeline": p, "workers": 1, "batch_size": 8, "samples": 80, "wall_s": w, "cpu_s": c}
                for w, c in spec] for p, spec in {"ours": [(1, 1), (2, 1), (4, 2)], "openclip": [(4, 4)]}.items()}
    rows = [data_throughput.summarize(r) for r in runs.values()]
    assert rows[0]["samples_per_s"] == 40 and rows[0]["samples_per_cpu_s"] == 80
    ratio = data_throughput.compare(rows)[0]
    assert ratio["samples_per_cpu_s"] == pytest.approx(4.0) and ratio["wall_rates"].endswith(": met")


# -- data hot path -------------------------------------------------------------------------

def big_jpeg(size: int = 256) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)  # smooth ramps
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_plan_is_a_pure_function_of_seed_and_size():
    t = build_train_transform(AugmentConfig(color_jitter=0.2), 32, MEAN, STD)
    assert t.plan((300, 200), 7) == t.plan((300, 200), 7)
    assert len({t.plan((300, 200), s) for s in range(20)}) == 20
    for s in range(50):
        top, left, h, w = t.plan((300, 200), s).crop
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300


def test_reduced_scale_jpeg_decode_matches_full_decode():
    t = build_train_transform(AugmentConfig(), 32, MEAN, STD)
    raw = {"__key__": "k", "jpg": big_jpeg(), "txt": b"a caption"}
    plan = t.plan((256, 256), 3)
    assert t.decode_size(plan) is not None, "a >= 2x larger crop must allow a reduced decode"
    fast = torch.empty(3, 32, 32, dtype=torch.uint8)
    caption = decode_sample_into(raw, t, "random", 11, fast)
    # The same crop from a full decode (no draft): same geometry, close pixels.
    full = Image.open(io.BytesIO(raw["jpg"]))
    full.load()
    from train.core.rng import stable_seed

    slow = t.augment(full, t.plan(full.size, stable_seed("augment", 11))).float()
    assert caption == "a caption"
    assert (fast.float() - slow).abs().mean() < 0.05 * (slow.max() - slow.min())
    image, cap2 = decode_sample(raw, t, "random", 11)
    assert torch.equal(image, fast) and cap2 == caption


# -- the scripts, tiny, on CPU ---------------------------------------------------------------

def test_data_throughput_writes_both_pipelines(tiny_shards, ref_stack, tmp_path):
    out = tmp_path / "data.json"
    data_throughput.main(["--shards", str(tiny_shards), "--image-size", "32", "--batch-size", "8", "--workers", "1",
                          "--warmup", "1", "--batches", "2", "--repeats", "1", "--out", str(out)])
    rows = load(out)["rows"]
    assert {r["pipeline"] for r in rows} == {"ours", "openclip", "ratio ours/openclip"}
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert all(raw["image_shape"] == [3, 32, 32] and raw["samples"] == 16 for raw in load(out)["meta"]["raw"])


def test_train_throughput_all_modes_and_openclip_reference(tiny_shards, ref_stack, tmp_path):
    out = tmp_path / "train.json"
    train_throughput.main(["--models", "orbit-micro", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                           "--workers", "1", "--shards", str(tiny_shards), "--breakdown", "--openclip", "orbit-micro",
                           "--log-every", "1", "--device", "cpu", "--out", str(out)])
    rows = {r["mode"]: r for r in load(out)["rows"]}
    assert set(rows) == {"compute", "e2e", "breakdown", "open_clip_train e2e", "ratio ours/open_clip (e2e)"}
    assert rows["compute"]["gflops_per_step"] > 0 and rows["compute"]["mfu"] > 0
    assert rows["e2e"]["samples_per_s"] > 0 and rows["e2e"]["peak_mem_gib"] > 0
    assert all(rows["breakdown"][f"{p}_ms"] >= 0 for p in train_throughput.PHASES)
    assert rows["breakdown"]["forward_ms"] > 0 and rows["open_clip_train e2e"]["samples_per_s"] > 0


def test_train_throughput_side_by_side_interleaves_fresh_processes_of_both_sides(tiny_shards, ref_stack, tmp_path):
    """--repeats/--nproc: ours and open_clip_train alternate, each in fresh torchrun processes
    at the same precision; a row per run, the medians and their ratio."""
    out = tmp_path / "side.json"
    train_throughput.main(["--models", "orbit-micro", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                           "--workers", "0", "--shards", str(tiny_shards), "--openclip", "orbit-micro",
                           "--log-every", "1", "--device", "cpu", "--precision", "bf16", "--repeats", "2",
                           "--nproc", "2", "--out", str(out)])
    rows = load(out)["rows"]
    modes = [r["mode"] for r in rows]
    assert modes == ["ours e2e", "open_clip_train e2e"] * 2 + [
        "ours e2e median", "open_clip_train e2e median", "ratio ours/open_clip (medians)"]
    assert all(r["nproc"] == 2 and r["precision"] == "bf16" and r["samples_per_s"] > 0 for r in rows)
    ours = [r["samples_per_s"] for r in rows if r["mode"] == "ours e2e"]
    assert rows[4]["samples_per_s"] == pytest.approx(sorted(ours)[0] + (sorted(ours)[1] - sorted(ours)[0]) / 2)
    assert rows[-1]["samples_per_s"] == pytest.approx(rows[4]["samples_per_s"] / rows[5]["samples_per_s"])


def test_a_lever_row_overrides_our_config_only_and_bad_keys_are_config_errors(tiny_shards):
    from train.core.configbase import ConfigError

    cfg = train_throughput.make_config("orbit-micro", 8, tiny_shards, 0, "fp32",
                                       overrides=["train.compile=true", "train.unique_texts=true"])
    assert cfg.train.compile and cfg.train.unique_texts and cfg.data.batch_size == 8
    assert not train_throughput.make_config("orbit-micro", 8, tiny_shards, 0, "fp32").train.compile
    with pytest.raises(ConfigError, match="nope"):
        train_throughput.make_config("orbit-micro", 8, tiny_shards, 0, "fp32", overrides=["train.nope=1"])


def test_the_breakdown_times_the_engines_own_step(tiny_shards, monkeypatch):
    """Not a copy of the step: every timed step is a call of ``engine.step`` (also with the
    feature cache, which a copy of the plain step could not time)."""
    cfg = train_throughput.make_config("orbit-micro", 8, tiny_shards, 0, "fp32", accum_steps=2)
    setup = train_throughput.Setup(cfg, torch.device("cpu"), with_loader=True)
    calls = []
    real = setup.engine.step
    monkeypatch.setattr(setup.engine, "step", lambda batch: calls.append(1) or real(batch))
    row = train_throughput.breakdown(setup, steps=2, warmup=1)
    assert len(calls) == 3
    assert all(row[f"{p}_ms"] > 0 for p in ("forward", "loss", "backward", "optimizer"))
    assert row["step_ms"] >= row["forward_ms"] + row["backward_ms"]


def test_a_report_killed_midway_keeps_its_finished_rows(tmp_path):
    out = tmp_path / "r.json"
    code = ("import sys, time; from benchmarks.report import Report; r = Report(sys.argv[1], 'x', k=1); "
            "r.add({'row': 1}); r.add({'row': 2}); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert [proc.stdout.readline().strip() for _ in range(3)][-1] == "ready"  # after the two echoed rows
    proc.kill()
    proc.wait()
    payload = json.loads(out.read_text())
    assert payload["status"] == "running" and payload["rows"][-2:] == [{"row": 1}, {"row": 2}]
    assert "cpu" in payload["machine"] and payload["meta"] == {"k": 1}


def test_batch_memory_rows_per_size(tmp_path):
    out = tmp_path / "mem.json"
    batch_memory.main(["--model", "orbit-micro", "--micro", "16", "--batches", "16", "64", "--device", "cpu",
                       "--plan", "--out", str(out)])
    rows = load(out)["rows"]
    assert [(r["effective_batch"], r["accum_steps"], r["status"]) for r in rows] == [(16, 1, "ok"), (64, 4, "ok")]
    assert all(r["peak_mem_gib"] > 0 and r["step_s"] > 0 for r in rows)
    # The planner's prediction beside each size (on CPU the process also holds torch itself).
    assert all(r["planned_gib"] > 0 and r["planned_how"] == "counted" and r["measured_vs_planned"] > 0 for r in rows)


def test_loss_memory_rows_per_loss_and_implementation(tmp_path, monkeypatch):
    out = tmp_path / "loss.json"
    loss_memory.main(["--sizes", "300", "--dim", "8", "--block", "64", "--device", "cpu", "--out", str(out)])
    rows = {(r["loss"], r["impl"]): r for r in load(out)["rows"]}
    assert set(rows) == {(k, i) for k in ("clip", "siglip") for i in ("plain", "tiled")}
    assert all(r["status"] == "ok" and r["peak_above_inputs_gib"] >= 0 and r["seconds"] > 0 for r in rows.values())
    for kind in ("clip", "siglip"):  # same inputs, same loss, up to fp32 rounding
        assert rows[kind, "tiled"]["value"] == pytest.approx(rows[kind, "plain"]["value"], rel=1e-5)
        assert rows[kind, "tiled"]["time_vs_plain"] > 0
    # Where the plain loss cannot fit, the row says so instead of being run.
    monkeypatch.setattr(loss_memory, "available_bytes", lambda: 1 << 20)
    loss_memory.main(["--sizes", "300", "--dim", "8", "--losses", "clip", "--device", "cpu", "--out", str(out)])
    rows = {r["impl"]: r for r in load(out)["rows"]}
    assert rows["plain"]["status"].startswith("skipped: needs") and rows["tiled"]["status"] == "ok"
