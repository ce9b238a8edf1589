"""The memory planner: a counted step against measured peaks, extrapolation, CLI, trainer check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import REPO_ROOT as ROOT
from train.cli import main
from train.core import collectives
from train.core.config import load_config
from train.core.configbase import ConfigError
from train.loop import plan as planner
from train.loop.plan import largest_batch, parse_bytes, plan_step, should_check

MICRO = ["model.name=orbit-micro", "data.source=synthetic", "data.synthetic_image_size=32", "data.workers=0",
         "train.device=cpu", "train.precision=fp32", "train.progress=false", "train.log_every=1", "train.steps=10"]


def cfg(*overrides: str):
    return load_config(None, [*MICRO, *overrides])


def measured(overrides: list[str]) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("measure_step.py")), *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_start"]


@pytest.mark.parametrize("batch,accum", [(256, 1), (1024, 1), (1024, 4)])
def test_the_plan_matches_the_measured_peak_within_15_percent(batch, accum):
    overrides = [*MICRO, f"data.batch_size={batch}", f"train.accum_steps={accum}"]
    plan = plan_step(load_config(None, overrides))
    predicted = plan.device_peak + plan.batch_bytes  # the measurement holds one batch, no loader
    got = measured(overrides)
    assert abs(got - predicted) <= 0.15 * got, (batch, accum, predicted, got)


def test_more_accumulation_is_extrapolated_exactly_from_two_counted_steps(monkeypatch):
    # Blocks large next to the features, so that a wrong start of the line would show.
    c = cfg("data.batch_size=768", "train.accum_steps=24", "loss.block_size=128")
    monkeypatch.setattr(planner, "COUNT_UP_TO", 100)
    counted = plan_step(c)
    monkeypatch.setattr(planner, "COUNT_UP_TO", 4)
    guessed = plan_step(c)
    assert counted.extrapolated_from is None and guessed.extrapolated_from == (8, 16)
    assert guessed.batch_bytes == counted.batch_bytes and guessed.after_step == counted.after_step
    assert abs(guessed.step_peak - counted.step_peak) <= 0.01 * counted.step_peak, (guessed.step_peak, counted.step_peak)
    for name, peak in counted.phase_peaks.items():
        assert abs(guessed.phase_peaks[name] - peak) <= 0.01 * peak, name


def test_the_plan_is_per_rank_and_counts_the_gathered_columns():
    one, four = plan_step(cfg("data.batch_size=256", "loss.block_size=64"), world=1), \
        plan_step(cfg("data.batch_size=256", "loss.block_size=64"), world=4)
    assert four.effective_batch == 4 * one.effective_batch and four.batch_bytes == one.batch_bytes
    assert four.ddp_buckets > 0 and one.ddp_buckets == 0
    assert four.phase_peaks["loss"] > one.phase_peaks["loss"]  # 4x the columns' features


def test_planning_leaves_the_rng_and_the_comm_as_they_were():
    comm = collectives.current()
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    plan_step(cfg("data.batch_size=16"))
    assert torch.equal(torch.rand(3), want) and collectives.current() is comm


def test_the_largest_batch_fits_and_one_more_micro_batch_does_not():
    c = cfg("data.batch_size=64", "train.accum_steps=2", "loss.block_size=32")
    small, base = plan_step(c), plan_step(cfg("data.batch_size=32", "train.accum_steps=1", "loss.block_size=32"))
    memory = small.total_cpu + 6 * (small.total_cpu - base.total_cpu)
    best = largest_batch(c, memory)
    assert best is not None and best.total_cpu <= memory and best.batch_per_rank % 32 == 0
    k = best.accum_steps + 1
    assert plan_step(cfg(f"data.batch_size={32 * k}", f"train.accum_steps={k}", "loss.block_size=32")).total_cpu > memory
    assert largest_batch(c, 1 << 20) is None  # not even one micro-batch


def test_memory_sizes_and_when_the_trainer_checks():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1.5G") == 3 * 2**29
    with pytest.raises(ConfigError, match="not a memory size"):
        parse_bytes("lots")
    cpu = torch.device("cpu")
    assert not should_check("auto", cfg("data.batch_size=8"), cpu)
    assert should_check("auto", cfg("data.batch_size=4096"), cpu) and should_check("auto", cfg(), torch.device("cuda"))
    assert should_check("always", cfg(), cpu) and not should_check("never", cfg("data.batch_size=8192"), cpu)
    assert not should_check("always", cfg("train.engine=deepspeed"), cpu)


def test_cli_prints_the_plan_and_the_largest_batch(capsys):
    # A small loss block keeps the two counted steps of the extrapolation small (k1 = 2 blocks).
    assert main(["plan", *MICRO, "data.batch_size=64", "train.accum_steps=2", "loss.block_size=64", "--json",
                 "--memory", "4GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["effective_batch"] == 64 and out["plan"]["total_cpu"] > out["plan"]["device_peak"] > 0
    assert out["largest"]["total_cpu"] <= 4 * 2**30 and out["largest"]["batch_per_rank"] > 64
    assert main(["plan", *MICRO, "data.batch_size=64", "--world", "2"]) == 0
    text = capsys.readouterr().out
    assert "effective batch 128 = 2 rank(s) x 64" in text and "peak by phase" in text


@pytest.mark.parametrize("argv,message", [
    (["--memory", "lots"], "not a memory size"),
    (["train.engine=deepspeed"], "counts train.engine=ddp only"),
    (["--world", "0"], "--world must be >= 1"),
    (["data.batchsize=3"], "batchsize"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    assert main(["plan", *MICRO, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_trainer_logs_the_plan_and_refuses_what_cannot_fit(tmp_path, monkeypatch, caplog):
    from train.trainer import run

    base = [*MICRO, "data.batch_size=16", "data.synthetic_samples=64", "train.steps=1", "train.memory_check=always",
            f"run.root={tmp_path}"]
    caplog.set_level("INFO", logger="train")
    assert run(load_config(None, [*base, "run.name=fits"])).status == "finished"
    assert any("memory plan (counted on cpu): effective batch 16" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(planner, "available_host_bytes", lambda: 1 << 20)
    with pytest.raises(ConfigError, match=r"needs about .* of memory .* 0.0 GiB available: lower data.batch_size"):
        run(load_config(None, [*base, "run.name=too-big"]))
    assert not (tmp_path / "too-big").exists()  # refused before anything is written


SHIPPED = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in
                 [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "recipes").glob("*.yaml")])


@pytest.mark.slow
def test_the_planner_answers_for_every_shipped_config(capsys):
    assert len(SHIPPED) >= 8
    for name in SHIPPED:
        assert main(["plan", "--config", name, "--json"]) == 0, name
        plan = json.loads(capsys.readouterr().out)["plan"]
        assert plan["device_peak"] > plan["state"] > 0, name
