"""``python -m train`` turns user errors into one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT
from tests.distutil import run_distributed
from tests.train.test_trainer import MICRO
from train.cli import main


def _main(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


def _args(tmp_path: Path, *overrides: str) -> list[str]:
    return ["--config", "demo", *MICRO, "train.steps=2", f"run.root={tmp_path}", "run.name=r", *overrides]


def test_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a checkpoint" * 10)
    (tmp_path / "empty").mkdir()
    cases = {
        "typo": (["optim.lrr=1"], "error: unknown config key 'optim.lrr'"),
        "missing shards": (["data.source=shards", f"data.shards=[{{path: {tmp_path / 'nowhere'}}}]"],
                           f"error: training shards {tmp_path / 'nowhere'} not found; build them first"),
        "empty shards": (["data.source=shards", f"data.shards=[{{path: {tmp_path / 'empty'}}}]"],
                         f"error: no sizes.json and no *.tar shards in {tmp_path / 'empty'}"),
        "unknown benchmark": (["eval.benchmarks=[no_such_benchmark]"], "error: unknown benchmark 'no_such_benchmark'"),
        "unreadable model file": ([f"model.pretrained={garbage}"],
                                  f"error: {garbage}: not a readable PyTorch or safetensors checkpoint"),
        "no cuda": (["train.device=cuda"], "error: train.device=cuda but CUDA is not available"),
    }
    for name, (overrides, expected) in cases.items():
        rc, lines = _main(_args(tmp_path, *overrides), capsys)
        assert rc == 2, name
        assert len(lines) == 1 and lines[0].startswith(expected), (name, lines)


def test_a_bad_cpu_bf16_override_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ORBITCLIP_CPU_BF16", "yes")
    rc, lines = _main(_args(tmp_path, "train.precision=auto"), capsys)
    assert rc == 2 and lines == ["error: ORBITCLIP_CPU_BF16 must be 0 or 1 (or unset to detect), got 'yes'"]


def _resume_on_two_ranks(rank: int, world: int, root: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(_args(Path(root), "train.steps=3"))
    return rc, err.getvalue()


def test_a_world_size_that_differs_from_the_checkpoint_is_one_line(tmp_path, capsys):
    assert main(_args(tmp_path)) == 0  # one process: checkpoint at step 2
    capsys.readouterr()
    for rc, err in run_distributed(_resume_on_two_ranks, 2, str(tmp_path), timeout=180):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err
        assert "was written by 1 ranks, this job has 2" in lines[0] and "model.pretrained=" in lines[0]


def test_the_real_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "train", *_args(tmp_path, "eval.benchmarks=[nope]")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown benchmark 'nope'")


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_help_shows_an_example(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "example: python -m train --config" in capsys.readouterr().out


def test_optimizer_and_schedule_settings_are_one_line(tmp_path, capsys):
    for overrides, expected in [(["optim.lr=0"], "error: need 0 <= optim.min_lr <= optim.lr and lr > 0"),
                                (["train.log_every=0"], "error: train.log_every must be >= 1")]:
        rc, lines = _main(_args(tmp_path, *overrides), capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(expected), (overrides, lines)
