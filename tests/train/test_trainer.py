"""The trainer in-process: run directory, TensorBoard, preemption, NaN stop, cross-rank metrics."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.distutil import run_distributed
from tests.precision import TOLERANCE
from train.cli import main
from train.core.collectives import Comm
from train.core.config import Config, load_config
from train.core.distenv import DistEnv
from train.core.rundir import RunDir
from train.loop.metrics import MetricLogger, NonFiniteLossError
from train.optim.schedule import lr_at
from train.trainer import RunResult, run

MICRO = [
    "model.name=orbit-micro", "data.source=synthetic", "data.batch_size=8", "data.workers=0",
    "data.synthetic_samples=64", "data.synthetic_image_size=32", "train.log_every=2",
    "train.checkpoint_every=3", "train.progress=false", "optim.warmup_steps=2",
    # Runs are compared bit for bit or at fp32 rounding: fp32 explicitly, whatever the CPU.
    "train.precision=fp32",
]


def micro_cfg(run_dir: Path, *overrides: str) -> Config:
    """A run of orbit-micro on in-memory synthetic scenes (a fraction of a second per step)."""
    return load_config(None, [*MICRO, f"run.root={run_dir.parent}", f"run.name={run_dir.name}", *overrides])


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run, by step, over all its event files (one per attempt)."""
    from benchmarks.curves import read_scalars

    return read_scalars(run_dir / "tb")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run; other tests compare against its final weights."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = run(micro_cfg(run_dir, "train.steps=8"))
    assert result == RunResult("finished", 8, run_dir)
    return run_dir


def test_run_dir_layout_and_tensorboard(baseline):
    cfg = load_config(baseline / "config.yaml")
    assert cfg.train.steps == 8 and cfg.model.name == "orbit-micro"
    ckpts = baseline / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000008"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000006", "step_0000008"]  # keep 2
    logged = scalars(baseline)
    for tag in ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s", "data_wait_frac", "peak_mem_gb"):
        # Every log_every=2 steps, plus step 3: a checkpoint first reduces the pending window.
        assert [s for s, _ in logged[f"train/{tag}"]] == [2, 3, 4, 6, 8], tag
    # Each point is the mean over its window of steps: lr of steps 1 and 2 (0-based 0, 1).
    lrs = dict(logged["train/lr"])
    assert lrs[2] == pytest.approx((lr_at(0, cfg.optim, 8) + lr_at(1, cfg.optim, 8)) / 2, rel=1e-6)
    assert lrs[4] == pytest.approx(lr_at(3, cfg.optim, 8), rel=1e-6)
    assert all(0.0 <= v <= 1.0 for _, v in logged["train/data_wait_frac"])
    assert all(v > 0.01 for _, v in logged["train/peak_mem_gb"])
    losses = [v for _, v in logged["train/loss"]]
    assert all(math.isfinite(v) for v in losses)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(baseline / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(cfg.optim.lr)
    assert hparams["model.name"].string_value == "orbit-micro"


class _Hook:
    """Wraps the engine built by the trainer to act at a given step (signal, NaN)."""

    def __init__(self, monkeypatch, at: int, action):
        import train.trainer

        real = train.trainer.build_engine
        self.calls, self.keys = 0, None

        def build(*args, **kwargs):
            engine = real(*args, **kwargs)
            step = engine.step

            def wrapped(batch):
                self.calls += 1
                out = step(batch)
                if self.calls == at:
                    self.keys = list(batch.keys)
                    out = action(out) or out
                return out

            engine.step = wrapped
            return engine

        monkeypatch.setattr(train.trainer, "build_engine", build)


def test_sigterm_checkpoints_preempts_and_resume_is_exact(tmp_path, monkeypatch, baseline):
    run_dir = tmp_path / "run"
    cfg = micro_cfg(run_dir, "train.steps=8")
    _Hook(monkeypatch, at=4, action=lambda out: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    result = run(cfg)
    assert result == RunResult("preempted", 4, run_dir)
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert not (run_dir / "model.pt").exists()
    monkeypatch.undo()
    result = run(cfg)  # train.resume=auto is the default
    assert result == RunResult("finished", 8, run_dir)
    assert_bit_identical(final_state(run_dir), final_state(baseline))
    # The resumed run's TensorBoard continues at step 6 and 8.
    assert [s for s, _ in scalars(run_dir)["train/loss"]][-2:] == [6, 8]


def test_nan_loss_stops_with_step_and_keys(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    hook = _Hook(monkeypatch, at=5, action=lambda out: {**out, "loss": torch.tensor(float("nan"))})
    with pytest.raises(NonFiniteLossError) as err:
        run(micro_cfg(run_dir, "train.steps=8", "train.checkpoint_every=4", "train.log_every=3"))
    message = str(err.value)
    assert "step 5" in message and hook.keys and all(k in message for k in hook.keys)
    # The NaN is caught when the window is reduced, before the checkpoint of step 6 could be written.
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"


class _Poison:
    """Puts a NaN into the images of the given steps' batches (the real engine then sees a NaN
    loss and NaN gradients) and snapshots the weights around those steps."""

    def __init__(self, monkeypatch, steps: set[int]):
        import train.trainer

        real = train.trainer.build_engine
        self.calls, self.unchanged, self.finite = 0, {}, {}

        def build(*args, **kwargs):
            engine = real(*args, **kwargs)
            step = engine.step

            def wrapped(batch):
                self.calls += 1
                if self.calls not in steps:
                    return step(batch)
                batch.images = engine.forward.normalize(batch.images)  # uint8 has no NaN: as float
                batch.images[0, 0, 0, 0] = float("nan")
                before = {k: v.clone() for k, v in engine.model.state_dict().items()}
                out = step(batch)
                after = engine.model.state_dict()
                self.unchanged[self.calls] = all(torch.equal(before[k], after[k]) for k in before)
                self.finite[self.calls] = float(out["finite"])
                return out

            engine.step = wrapped
            return engine

        monkeypatch.setattr(train.trainer, "build_engine", build)


def test_a_nonfinite_step_is_skipped_on_the_device_and_counted(tmp_path, monkeypatch):
    poison = _Poison(monkeypatch, {3})
    result = run(micro_cfg(tmp_path / "run", "train.steps=6", "train.max_nonfinite_steps=2"))
    assert result.status == "finished" and result.step == 6
    assert poison.unchanged == {3: True} and poison.finite == {3: 0.0}  # the update was skipped
    logged = scalars(tmp_path / "run")
    assert [v for _, v in logged["train/skipped_steps"]][-1] == 1.0
    assert all(math.isfinite(v) for _, v in logged["train/loss"])  # the NaN step is left out of the means
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path / "run").values())


def test_n_nonfinite_steps_in_a_row_stop_the_run_naming_them(tmp_path, monkeypatch):
    poison = _Poison(monkeypatch, {3, 4})
    with pytest.raises(NonFiniteLossError, match=r"at 2 step\(s\) in a row, from step 3"):
        run(micro_cfg(tmp_path / "run", "train.steps=8", "train.max_nonfinite_steps=2", "train.log_every=4"))
    assert poison.unchanged == {3: True, 4: True}


def test_main_cli_errors(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["--config", "configs/demo.yaml", "optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err


def _two_ranks(rank: int, world: int, root: str, precision: str) -> dict:
    env = DistEnv(rank=rank, world_size=world)
    # 1) MetricLogger alone: rank-dependent values are averaged, a NaN on one rank stops both,
    #    and a stop requested on rank 1 only is agreed by both at the flush.
    logger = MetricLogger(RunDir(Path(root) / "unit"), Comm(env), torch.device("cpu"), total_steps=4, log_every=2,
                          progress=False)
    logger.record(1, {"loss": torch.tensor(1.0 + rank)}, ["a"], 0.0)
    logger.record(2, {"loss": torch.tensor(3.0 + rank)}, ["b"], 0.0)
    flags = logger.flush({"stop": rank == 1})
    unit = logger.last["loss"]
    logger.record(3, {"loss": torch.tensor(float("nan") if rank == 1 else 1.0)}, [f"r{rank}"], 0.0)
    logger.record(4, {"loss": torch.tensor(1.0)}, ["d"], 0.0)
    try:
        logger.flush()
        nan_error = ""
    except NonFiniteLossError as e:
        nan_error = str(e)
    logger.close()
    stop = flags["stop"]
    # 3) The whole trainer at world 2.
    result = run(micro_cfg(Path(root) / "w2", "train.steps=2", "train.log_every=1", "data.batch_size=4",
                           f"train.precision={precision}"), env)
    losses = [v for _, v in scalars(result.run_dir)["train/loss"]] if rank == 0 else None
    return {"unit": unit, "nan": nan_error, "stop": stop, "losses": losses, "step": result.step}


def test_metrics_reduced_across_two_ranks(tmp_path, cpu_bf16, caplog):
    """Under both answers to "native bf16?", with ``train.precision: auto`` (the default)."""
    caplog.set_level("INFO", logger="train")
    out = run_distributed(_two_ranks, 2, str(tmp_path), "auto", timeout=240)
    assert [o["unit"] for o in out] == [2.5, 2.5]  # mean over steps and ranks, not rank 0's 2.0
    assert all("step 3" in o["nan"] for o in out) and "r1" in out[1]["nan"]
    assert [o["stop"] for o in out] == [True, True]
    assert [o["step"] for o in out] == [2, 2]
    # The logged loss of 2 ranks x 4 samples is the full-batch loss of 1 rank x 8 samples.
    single = run(micro_cfg(tmp_path / "w1", "train.steps=2", "train.log_every=1", "data.batch_size=8",
                           "train.precision=auto"))
    full = [v for _, v in scalars(single.run_dir)["train/loss"]]
    # fp32: the same loss to rounding; bf16: the towers round 2 x 4 and 1 x 8 samples differently.
    assert out[0]["losses"] == pytest.approx(full, rel=TOLERANCE[cpu_bf16]["loss"], abs=1e-6)
    assert f"precision {cpu_bf16} (auto: " in caplog.text  # what ran, and the start line says why


def test_pictures_reach_tensorboard(tmp_path):
    """Training samples once at the start; each evaluation's confusion matrix and retrieval examples."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run(micro_cfg(run_dir, "train.steps=4", "eval.every=2", "eval.benchmarks=[demo]"))
    images: dict[str, list[int]] = {}
    for events in sorted((run_dir / "tb").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    assert images["train/samples"] == [0]
    assert images["eval/demo/confusion"] == [2, 4]
    assert images["eval/demo/retrieval_examples"] == [2, 4]
    sample = acc.Images("train/samples")[0]
    assert sample.width >= 32 * 2 and sample.height >= 32  # a grid of the 8 augmented 32 px samples
