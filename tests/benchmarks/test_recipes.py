"""The recipes' plumbing: configs and registry agree, every recipe trains a few steps on
CPU at tiny size, the check catches a drop, and the curve exporter draws TensorBoard logs.

The recipes themselves train for minutes: ``python -m benchmarks.recipes check`` re-runs
them (not a unit test).
"""

from __future__ import annotations

import copy

import pytest

from benchmarks import curves, recipes, story
from train.core.config import load_config
from train.trainer import RunResult, run

from tests import REPO_ROOT as ROOT
RECIPE_DIR = ROOT / "configs" / "recipes"


def test_registry_and_configs_agree():
    shipped = {p.stem for p in RECIPE_DIR.glob("*.yaml")}
    assert set(recipes.RECIPES) | {"story_finetune_cpu"} == shipped
    for name, rec in recipes.RECIPES.items():
        cfg = load_config(ROOT / rec.config)
        assert cfg.run.name == name and cfg.run.root == "runs/recipes"
        assert (cfg.train.device == "cpu") == rec.cpu, name
        text = (ROOT / rec.config).read_text()
        assert "Budget:" in text.split("\nrun:")[0], f"{name}: the header must state the budget"
        # the recipe trains on what its builds write
        built = {b.output for b in rec.builds}
        assert {s.path for s in cfg.data.shards} <= built, name
        assert set(cfg.eval.benchmarks) == set(rec.benchmarks), name
    assert story.FINETUNE.config.endswith("story_finetune_cpu.yaml")
    ft = load_config(ROOT / story.FINETUNE.config)
    pre = load_config(ROOT / recipes.RECIPES[story.PRETRAIN].config)
    assert ft.model.pretrained == f"runs/recipes/{story.PRETRAIN}"
    assert (ft.model.name, ft.model.image_size) == (pre.model.name, pre.model.image_size)


@pytest.mark.parametrize("name", [*recipes.RECIPES, "story_finetune_cpu"])
def test_recipe_runs_a_few_steps_on_cpu_at_tiny_size(name, tmp_path):
    path = RECIPE_DIR / f"{name}.yaml"
    tiny = [
        f"run.root={tmp_path}", "model.name=orbit-micro", "model.image_size=null", "model.pretrained=null",
        "data.source=synthetic", "data.shards=[]", "data.workers=0", "data.batch_size=8",
        "data.synthetic_samples=64", "train.steps=2", "train.epochs=null", "train.device=cpu",
        "train.precision=fp32", "eval.benchmarks=[]",
    ]
    cfg = load_config(path, tiny)
    real = load_config(path)
    # the tiny run keeps the recipe's own training choices
    assert (cfg.optim, cfg.loss, cfg.train.unique_texts) == (real.optim, real.loss, real.train.unique_texts)
    assert cfg.model.freeze_token_embedding == real.model.freeze_token_embedding
    result = run(cfg)
    assert result == RunResult("finished", 2, tmp_path / real.run.name)
    assert (result.run_dir / "model.pt").is_file()


def _record(acc: float, samples: int = 384_000) -> dict:
    return {"recipe": "eurosat_scratch_cpu", "metrics": {"eurosat/acc1": acc}, "train_wall_s": 600.0,
            "train_samples": samples, "budget_samples": 400_000, "overrides": [], "target": 0.9,
            "command": "python -m train ...", "eval_wall_s": 12.0, "table": "| model | eurosat acc1 |\n|---|---:|\n| x | 91.00 |",
            "machine": {"commit": "abc1234", "time": "2026-11-23T12:00:00", "cpu_count": 2, "torch": "2.13.0",
                        "cpu": "Xeon (avx512_bf16)"}}


def test_check_flags_a_drop_of_more_than_the_tolerance_and_samples_over_the_budget():
    old = _record(0.91)
    assert recipes.compare(_record(0.895), old, 2.0) == []  # 1.5 points: within tolerance
    assert recipes.compare(_record(0.925), old, 2.0) == []
    drop = recipes.compare(_record(0.885), old, 2.0)
    assert len(drop) == 1 and "91.00 recorded -> 88.50 now" in drop[0]
    missing = copy.deepcopy(_record(0.91))
    missing["metrics"] = {}
    assert recipes.compare(missing, old, 2.0)
    assert recipes.compare(_record(0.91, samples=400_000), old, 2.0) == []  # the budget itself is allowed
    over = recipes.compare(_record(0.91, samples=400_256), old, 2.0)
    assert over == ["trained on 400,256 samples, budget 400,000"]


def test_only_a_run_of_the_recipe_as_committed_within_its_budget_is_recordable():
    assert recipes.recordable(_record(0.91), "eurosat_scratch_cpu")["metrics"] == {"eurosat/acc1": 0.91}
    steps = load_config(ROOT / recipes.RECIPES["eurosat_scratch_cpu"].config).train.steps
    restated = {**_record(0.91), "overrides": [f"train.steps={steps}"]}  # a variant the config has adopted
    assert recipes.recordable(restated, "eurosat_scratch_cpu") is restated
    for bad, why in [({"overrides": ["train.steps=10"]}, "overrides train.steps=10"),
                     ({"train_samples": 500_000}, "trained on 500,000 samples, budget 400,000"),
                     ({"recipe": "rsicd_scratch_cpu"}, "not 'eurosat_scratch_cpu'")]:
        with pytest.raises(SystemExit, match=why):
            recipes.recordable({**_record(0.91), **bad}, "eurosat_scratch_cpu")


def test_the_budget_is_counted_from_the_config_steps_times_global_batch():
    rec = recipes.RECIPES["eurosat_scratch_cpu"]
    cfg = load_config(ROOT / rec.config)
    assert recipes.train_samples(rec, []) == cfg.train.steps * cfg.data.batch_size * rec.nproc
    assert recipes.train_samples(rec, ["train.steps=10", "data.batch_size=4"]) == 10 * 4 * rec.nproc
    for name, r in recipes.RECIPES.items():
        assert recipes.train_samples(r, []) <= r.budget_samples, f"{name} as shipped is over its budget"


def test_results_markdown_states_target_machine_samples_table_and_ablations():
    ablations: dict = {}
    recipes.add_ablation(ablations, "baseline", _record(0.87))
    recipes.add_ablation(ablations, "EMA", {**_record(0.88), "overrides": ["train.ema_decay=0.999"]})
    recipes.add_ablation(ablations, "baseline", _record(0.86))  # the same label again replaces its row
    assert [r["label"] for r in ablations["eurosat_scratch_cpu"]] == ["EMA", "baseline"]
    md = recipes.results_markdown({"eurosat_scratch_cpu": _record(0.91), "other": _record(0.80)}, ablations)
    assert "## eurosat_scratch_cpu" in md and "commit `abc1234`" in md and "2 CPU cores, Xeon (avx512_bf16)" in md
    assert "training 384,000 samples (budget 400,000) in 10.0 min (640 samples/s on this machine)" in md
    assert "eurosat/acc1 >= 90 -> 91.00 (reached)" in md
    assert "eurosat/acc1 >= 90 -> 80.00 (NOT reached)" in md
    assert "| x | 91.00 |" in md
    assert "| EMA | `train.ema_decay=0.999` | 384,000 | 10.0 min | 88.00 |" in md
    assert "| baseline | `(the recipe)` | 384,000 | 10.0 min | 86.00 |" in md
    assert md.count("ablations (one change per row") == 1  # only the recipe that has rows


def test_missing_data_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(recipes, "DATA", tmp_path)
    rec = copy.deepcopy(recipes.RECIPES["eurosat_scratch_cpu"])
    for b in rec.builds:
        b.output = str(tmp_path / "nowhere")
    assert "eurosat_rgb is absent" in recipes.missing_data(rec)


def test_curves_draws_tensorboard_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for run_name, slope in (("a", 1.0), ("b", 2.0)):
        w = SummaryWriter(log_dir=str(tmp_path / run_name / "tb"))
        for step in range(1, 6):
            w.add_scalar("train/loss", 5.0 - slope * 0.1 * step, step)
            w.add_scalar("eval/eurosat/acc1", 0.1 * step, step)
        w.add_scalar("eval/once", 1.0, 5)
        w.close()
    series = curves.read_scalars(tmp_path / "a")
    assert series["train/loss"][0] == (1, pytest.approx(4.9)) and len(series["train/loss"]) == 5
    out = tmp_path / "fig" / "curves.png"
    assert curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"
    drawn = curves.plot({"a": series}, None, tmp_path / "c.png")
    assert drawn == ["train/loss", "eval/eurosat/acc1"]  # single-point eval scalars are left out
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        curves.read_scalars(tmp_path / "empty")
    with pytest.raises(ValueError, match="nothing to plot"):
        curves.plot({"a": series}, ["train/nope"], tmp_path / "d.png")


def test_readme_splice_replaces_only_between_markers():
    text = f"intro\n{recipes.BEGIN}\nold table\n{recipes.END}\noutro\n"
    out = recipes.splice_readme(text, "new table\n")
    assert out == f"intro\n{recipes.BEGIN}\nnew table\n{recipes.END}\noutro\n"
    assert recipes.splice_readme(out, "newer") .count("newer") == 1
    with pytest.raises(ValueError, match="markers"):
        recipes.splice_readme("no markers", "x")
    assert recipes.BEGIN in (ROOT / "README.md").read_text()
