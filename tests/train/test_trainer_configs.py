"""Every shipped config loads; every *_tiny recipe trains; a tiny run actually learns."""

from __future__ import annotations

import json

import pytest

from train.core.config import load_config
import configs
from train.cli import DEFAULT_CONFIG
from train.trainer import RunResult, run

from tests import REPO_ROOT as ROOT
SKIP_DIRS = {"benchmarks", "deepspeed", "models"}
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not SKIP_DIRS & set(p.relative_to(ROOT / "configs").parts))
TINY = [p for p in CONFIGS if p.stem.endswith("_tiny")]


def test_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "eurosat_vitb32.yaml", "eurosat_vitb32_tiny.yaml", "rsicd_vitb32.yaml",
            "rsicd_vitb32_tiny.yaml"} <= names
    assert configs.run_config(DEFAULT_CONFIG) == ROOT / "configs" / "demo.yaml"
    assert configs.run_config("recipes/eurosat_scratch_cpu") == ROOT / "configs" / "recipes" / "eurosat_scratch_cpu.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads(path):
    cfg = load_config(path)
    if path.stem.endswith("_tiny"):
        # A tiny variant must stay CPU-cheap: no pretrained download, a micro/tiny tower.
        assert cfg.model.pretrained is None and cfg.model.name.startswith("orbit-")
        assert cfg.data.source == "synthetic" or cfg.data.shards


def test_recipes_mirror_their_references():
    rsicd = load_config(ROOT / "configs" / "rsicd_vitb32.yaml")
    assert (rsicd.optim.name, rsicd.optim.lr, rsicd.optim.schedule) == ("adam", 5e-6, "linear")
    assert rsicd.data.batch_size * 8 == 1024 and rsicd.data.caption_sampling == "random"
    assert rsicd.model.pretrained == "openai" and rsicd.model.name == "ViT-B-32"
    euro = load_config(ROOT / "configs" / "eurosat_vitb32.yaml")
    assert euro.train.epochs == 16 and euro.optim.name == "adamw" and euro.optim.lr <= 1e-4
    assert euro.model.pretrained == "openai" and euro.eval.benchmarks == ["eurosat"]


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_recipe_trains_two_steps(path, tmp_path):
    result = run(load_config(path, ["train.steps=2", f"run.root={tmp_path}"]))
    assert result == RunResult("finished", 2, tmp_path / load_config(path).run.name)
    assert (result.run_dir / "model.pt").is_file()


@pytest.mark.slow
def test_tiny_demo_learns_and_beats_chance_zero_shot(tmp_path):
    """orbit-tiny on synthetic scenes: the loss falls and held-out zero-shot accuracy is far above chance."""
    from shards.synthetic import CLASSNAMES
    from tests.train.test_trainer import scalars

    cfg = load_config(configs.run_config(DEFAULT_CONFIG), [
        f"run.root={tmp_path}", "run.name=demo", "data.source=synthetic", "data.batch_size=64",
        "data.workers=0", "data.synthetic_samples=512", "train.steps=60", "train.log_every=10",
        "train.checkpoint_every=1000", "train.progress=false", "optim.lr=2e-3",
    ])
    result = run(cfg)
    losses = [v for _, v in scalars(result.run_dir)["train/loss"]]
    assert losses[-1] < 0.7 * losses[0], losses
    results = json.loads((result.run_dir / "eval" / "step_0000060.json").read_text())["results"]
    chance = 1 / len(CLASSNAMES)
    assert results["demo/acc1"] > 3 * chance, results
