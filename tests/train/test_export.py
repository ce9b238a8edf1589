"""`python -m train export`: runs and checkpoints out as transformers CLIPModel, open_clip local-dir
and plain state-dict folders, loaded back by those libraries and compared with our model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.test_trainer import micro_cfg
from train.cli import main
from train.core.config import ModelConfig, load_config, save_config
from train.core.rundir import RunDir
from train.export import ExportError, export, resolve_source
from train.model import build_model, load_model
from train.trainer import run

STEPS = 4  # checkpoints at 3 and 4 (micro_cfg checkpoints every 3 steps)
MIN_COSINE = 0.9999
TEXTS = ["an aerial photo of a harbour with boats", "dense residential area next to a river", "farmland"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished orbit-micro run: final model.pt + open_clip_config.json, checkpoints 3 and 4."""
    run_dir = tmp_path_factory.mktemp("export") / "micro"
    assert run(micro_cfg(run_dir, f"train.steps={STEPS}")).status == "finished"
    return run_dir


@pytest.fixture(scope="module")
def hf_dir(trained: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "micro-hf"
    assert main(["export", str(trained), "--format", "hf", "--out", str(out)]) == 0
    return out


def _scenes(n: int = 4) -> list:
    from shards.synthetic import render_scene

    return [render_scene(i, seed=7, size=64).image for i in range(n)]  # 64 px: both pipelines resize


def _ours(bundle, images: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([bundle.eval_transform(im) for im in images])
    with torch.no_grad():
        return (bundle.model.encode_image(pixels, normalize=True),
                bundle.model.encode_text(bundle.tokenizer(texts), normalize=True))


def _cosines(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity
    return float(cos(a[0], b[0]).min()), float(cos(a[1], b[1]).min())


def test_trainer_writes_open_clip_config_next_to_final_model(trained: Path):
    data = json.loads((trained / "open_clip_config.json").read_text())
    assert data["model_cfg"]["vision_cfg"]["image_size"] == 32 and "patch_dropout" not in data["model_cfg"]["vision_cfg"]
    assert len(data["preprocess_cfg"]["mean"]) == 3 and data["orbitclip"] == {"arch": "orbit-micro", "step": STEPS}
    assert (trained / "model.pt").is_file()


def test_hf_export_loads_offline_and_matches(trained: Path, hf_dir: Path, capsys):
    from transformers import CLIPModel, CLIPProcessor

    files = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "README.md", "orbitclip_config.yaml"} <= files
    assert {"processor_config.json", "preprocessor_config.json"} & files
    hf = CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(hf_dir, local_files_only=True)
    ours = load_model(str(trained))
    ip = processor.image_processor
    assert tuple(ip.image_mean) == pytest.approx(ours.mean) and tuple(ip.image_std) == pytest.approx(ours.std)
    assert (ip.crop_size["height"], ip.crop_size["width"]) == (32, 32)
    # the user's path: the same PIL images and strings through each library's own preprocessing
    images = _scenes()
    inputs = processor(text=TEXTS, images=images, return_tensors="pt", padding="max_length", max_length=16)
    with torch.no_grad():
        out = hf(**inputs)
    image_cos, text_cos = _cosines(_ours(ours, images, TEXTS), (out.image_embeds, out.text_embeds))
    assert image_cos >= MIN_COSINE and text_cos >= MIN_COSINE, (image_cos, text_cos)
    assert float(hf.logit_scale.detach()) == pytest.approx(float(ours.model.logit_scale.detach()), abs=1e-6)
    card = (hf_dir / "README.md").read_text()
    assert f"`{trained}/model.pt` (step {STEPS})" in card and f"config `{trained}/config.yaml`" in card
    assert load_config(hf_dir / "orbitclip_config.yaml").train.steps == STEPS


def test_hf_export_prints_one_line_per_file_group(trained: Path, tmp_path: Path, capsys):
    out = tmp_path / "again"
    assert main(["export", str(trained), "--format", "hf", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (f"exported {trained}/model.pt, step {STEPS} -> {out} "
                        "(transformers CLIPModel + CLIPProcessor)")
    assert [line.split()[0] for line in lines[1:]] == ["model", "tokenizer", "processor", "card", "checked"]
    assert "32 px" in lines[3] and "min cosine image 1.0000" in lines[5]


def test_open_clip_export_loads_without_our_registry(trained: Path, tmp_path: Path, monkeypatch):
    import open_clip

    out = tmp_path / "oc"
    assert main(["export", str(trained), "--format", "open_clip", "--out", str(out)]) == 0
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()
    # open_clip alone must rebuild our architecture: hide the registered orbit-* configs
    registry = {k: v for k, v in open_clip.factory._MODEL_CONFIGS.items() if not k.startswith("orbit-")}
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", registry)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    monkeypatch.undo()
    ours = load_model(str(trained))
    images = _scenes()
    pixels = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        theirs = model.eval().encode_image(pixels, normalize=True), model.encode_text(tokenizer(TEXTS), normalize=True)
    image_cos, text_cos = _cosines(_ours(ours, images, TEXTS), theirs)
    assert image_cos >= MIN_COSINE and text_cos >= MIN_COSINE
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ours.model.state_dict().items())


def test_pt_export_is_the_run_model(trained: Path, tmp_path: Path):
    out = tmp_path / "pt"
    assert main(["export", str(trained / "checkpoints" / "step_0000003"), "--format", "pt", "--out", str(out)]) == 0
    got = torch.load(out / "model.pt", weights_only=True)
    want = torch.load(trained / "checkpoints" / "step_0000003" / "model.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "(step 3)" in (out / "README.md").read_text()
    assert torch.equal(load_model(f"local-dir:{out}").model.visual.proj, want["visual.proj"])


def test_siglip_model_is_refused_for_hf_and_exported_for_open_clip(tmp_path: Path, capsys):
    import open_clip

    bundle = build_model(ModelConfig(name="orbit-micro", init_logit_bias=-7.5))
    ckpt = tmp_path / "siglip.pt"
    torch.save(bundle.model.state_dict(), ckpt)
    assert main(["export", f"orbit-micro:{ckpt}", "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "logit_bias" in err and "use --format open_clip" in err
    assert not (tmp_path / "hf").exists()
    assert main(["export", f"orbit-micro:{ckpt}", "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert float(model.logit_bias) == pytest.approx(-7.5)


def test_round_trip_hf_finetune_export(hf_dir: Path, tmp_path: Path):
    """hf export -> `python -m train` with model.pretrained=hf:DIR -> hf export again.

    lr=1e-12 leaves every weight within float rounding of its start, so the second export
    must equal the first: nothing is lost or renamed on the way through training."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "ft"
    config = tmp_path / "ft.yaml"
    save_config(micro_cfg(run_dir, "train.steps=2"), config)
    assert main(["--config", str(config), f"model.pretrained=hf:{hf_dir}", "optim.lr=1e-12"]) == 0
    assert load_config(run_dir / "config.yaml").model.pretrained == f"hf:{hf_dir}"
    again = tmp_path / "ft-hf"
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(again)]) == 0
    first, second = load_file(hf_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    worst = max(float((first[k] - second[k]).abs().max()) for k in first)
    assert worst <= 1e-9, worst
    cfg1, cfg2 = (json.loads((d / "config.json").read_text()) for d in (hf_dir, again))
    assert cfg1 == cfg2
    assert (hf_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_run_source_picks_final_then_newer_checkpoint(trained: Path, tmp_path: Path):
    src = resolve_source(str(trained))
    assert src.weights == str(trained / "model.pt") and src.step == STEPS and src.run == RunDir(trained)
    step3 = resolve_source(str(trained / "checkpoints" / "step_0000003"))
    assert step3.step == 3 and not torch.equal(step3.bundle.model.visual.proj, src.bundle.model.visual.proj)
    copy = tmp_path / "continued"
    shutil.copytree(trained, copy)
    # a run resumed to more steps: the final model.pt is older than checkpoints/latest
    data = json.loads((copy / "open_clip_config.json").read_text())
    data["orbitclip"]["step"] = 3
    (copy / "open_clip_config.json").write_text(json.dumps(data))
    assert resolve_source(str(copy)).weights == str(copy / "checkpoints" / "step_0000004" / "model.pt")
    (copy / "model.pt").unlink()  # an unfinished run: the latest checkpoint
    assert resolve_source(str(copy)).step == STEPS


def test_zero_checkpoint_without_model_pt_is_consolidated(trained: Path, tmp_path: Path, monkeypatch):
    import train.engines.deepspeed.export as ds_export

    copy = tmp_path / "zero"
    shutil.copytree(trained, copy)
    ckpt = copy / "checkpoints" / "step_0000004"
    (ckpt / "model.pt").unlink()
    (ckpt / ds_export.META_FILE).write_text(json.dumps({"zero_stage": 3, "tag": "ds", "scalar_params": []}))
    state = torch.load(trained / "model.pt", weights_only=True)
    state["visual.proj"] = state["visual.proj"] * 2  # tell the consolidated weights apart
    seen = []
    monkeypatch.setattr(ds_export, "export_state_dict", lambda p: seen.append(Path(p)) or state)
    src = resolve_source(str(ckpt))
    assert seen == [ckpt] and "ZeRO shards, consolidated" in src.weights and src.step == 4
    assert torch.equal(src.bundle.model.visual.proj, state["visual.proj"])


def test_user_errors_are_one_line(trained: Path, tmp_path: Path, capsys):
    def fails(*argv: str) -> str:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    assert "no such run directory" in fails(str(tmp_path / "absent"), "--format", "hf", "--out", str(tmp_path / "o"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert "--overwrite" in fails(str(trained), "--format", "pt", "--out", str(tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert "run directory" in fails(str(trained), "--format", "pt", "--out", str(trained), "--overwrite")
    (tmp_path / "empty").mkdir()
    assert "not a run directory" in fails(str(tmp_path / "empty"), "--format", "pt", "--out", str(tmp_path / "o"))
    with pytest.raises(ExportError, match="choose one of"):
        export(resolve_source(str(trained)), "onnx", tmp_path / "o")
    assert main(["export", str(trained), "--format", "pt", "--out", str(tmp_path / "full"), "--overwrite"]) == 0
    assert not (tmp_path / "full" / "x").exists() and (tmp_path / "full" / "model.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp-*"))  # nothing left beside the outputs


@pytest.mark.slow
def test_stock_architecture_exports_to_open_clip_and_hf(tmp_path: Path):
    """A stock open_clip architecture (ViT-S-32, random init) both ways; the export itself checks
    the embeddings, here the files are loaded once more by the libraries' own entry points."""
    import open_clip
    from transformers import CLIPModel

    assert main(["export", "ViT-S-32", "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    ours = load_model("ViT-S-32")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.model.state_dict().items())
    assert main(["export", f"local-dir:{tmp_path / 'oc'}", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = CLIPModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf.config.vision_config.image_size == 224 and hf.config.text_config.max_position_embeddings == 77
