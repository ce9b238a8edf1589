"""train.model.hf: transformers CLIPModel <-> open_clip CLIP give the same features."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train.model import hf as hc  # noqa: E402  (ensures torchvision works before transformers)
import shutil  # noqa: E402

from train.core.config import Config, DataConfig, ModelConfig, TrainConfig, save_config  # noqa: E402
from train.model.factory import ModelLoadError, build_model, load_model, save_model_config  # noqa: E402

import open_clip  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _hf_model(act: str = "quick_gelu", eos: int = 999, vocab: int = 1000, eps: float = 1e-5,
              ctx: int = 12, seed: int = 0) -> CLIPModel:
    """A tiny random HF CLIP with multi-head towers and *every* weight randomised
    (HF init leaves biases 0 and norms 1, which would hide swapped tensors)."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=ctx, hidden_act=act, eos_token_id=eos,
                         layer_norm_eps=eps, bos_token_id=None, pad_token_id=None),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80,
                           image_size=16, patch_size=4, hidden_act=act, layer_norm_eps=eps),
        projection_dim=24,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


def _convert(hf: CLIPModel) -> tuple[dict, open_clip.CLIP]:
    cfg = hc.open_clip_config_from_hf(hf.config)
    model = open_clip.CLIP(**cfg).eval()
    model.load_state_dict(hc.hf_to_open_clip_state_dict(hf.state_dict()), strict=True)
    return cfg, model


def _token_ids(eos: int, ctx: int = 12, pad: int = 0) -> torch.Tensor:
    """Rows with the EOT at different places; other ids exceed ``eos`` when it is small,
    so argmax pooling would pick a different token than eos pooling."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 900, (3, ctx), generator=g)
    for row, pos in enumerate((5, ctx - 1, 2)):
        ids[row, pos] = eos
        ids[row, pos + 1:] = pad
    return ids


def _check_equal(hf: CLIPModel, oc: torch.nn.Module, ids: torch.Tensor, size: int = 16) -> None:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_img = hf.get_image_features(pixel_values=x).pooler_output
        hf_txt = hf.get_text_features(input_ids=ids).pooler_output
        oc_img, oc_txt = oc.encode_image(x), oc.encode_text(ids)
    assert hf_img.abs().mean() > 0.1 and hf_txt.abs().mean() > 0.1  # a meaningful comparison
    torch.testing.assert_close(oc_img, hf_img, **TOL)
    torch.testing.assert_close(oc_txt, hf_txt, **TOL)


@pytest.mark.parametrize("act,eos,pool,pad", [
    ("quick_gelu", 999, "argmax", 0),   # EOT is the largest id (like CLIP's 49407 of 49408)
    ("gelu", 2, "argmax", 0),           # HF's legacy eos_token_id=2 means argmax pooling
    ("quick_gelu", 5, "eos", 5),        # small EOT id, padded with EOT: first occurrence wins
])
def test_hf_to_open_clip_features_match(act: str, eos: int, pool: str, pad: int):
    hf = _hf_model(act=act, eos=eos, eps=1e-6 if act == "gelu" else 1e-5)
    cfg, oc = _convert(hf)
    assert cfg["quick_gelu"] == (act == "quick_gelu") and cfg["text_cfg"]["pool_type"] == pool
    _check_equal(hf, oc, _token_ids(eos, pad=pad))


def test_comparison_detects_a_wrong_conversion():
    """Negative control: the same weights with the other activation must not pass."""
    hf = _hf_model(act="gelu", eos=999)
    cfg = hc.open_clip_config_from_hf(hf.config)
    cfg["quick_gelu"] = True
    oc = open_clip.CLIP(**cfg).eval()
    oc.load_state_dict(hc.hf_to_open_clip_state_dict(hf.state_dict()))
    with pytest.raises(AssertionError):
        _check_equal(hf, oc, _token_ids(999))


def test_open_clip_to_hf_to_open_clip_round_trip():
    bundle = load_model("orbit-micro")
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    hf = hc.open_clip_to_hf_model(bundle.model, bundle.model_cfg)
    assert hf.config.text_config.eos_token_id == 49407  # CLIP BPE: EOT is the largest id
    ids = bundle.tokenizer(["a field of wheat", "boats in a harbour", "x"])
    _check_equal(hf, bundle.model, ids, size=32)
    cfg2, back = _convert(hf)
    assert cfg2["vision_cfg"]["head_width"] == 16 and cfg2["text_cfg"]["heads"] == 2
    for k, v in bundle.model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_load_model_hf_folder(tmp_path: Path):
    hf = _hf_model(vocab=49408, eos=49407, ctx=16)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.3, 0.3, 0.3], "image_std": [0.2, 0.2, 0.2]}')
    bundle = load_model(f"hf:{tmp_path / 'hf'}")
    assert bundle.image_size == 16 and bundle.mean == (0.3, 0.3, 0.3) and bundle.std == (0.2, 0.2, 0.2)
    ids = bundle.tokenizer(["sparse residential area", "a beach"])
    assert ids.shape == (2, 16) and int(ids.max()) == 49407
    _check_equal(hf, bundle.model, torch.cat([ids, ids[:1]]))
    # training can start from it too (the HF folder defines the architecture)
    train_bundle = build_model(ModelConfig(pretrained=f"hf:{tmp_path / 'hf'}", lock_image=True))
    assert not any(p.requires_grad for p in train_bundle.model.visual.parameters())


def test_run_fine_tuned_from_hf_folder(tmp_path: Path):
    """A run's architecture comes from its hf: source, or from its own open_clip_config.json."""
    hf = _hf_model(vocab=49408, eos=49407, ctx=16)
    hf.save_pretrained(tmp_path / "hf")
    bundle = build_model(ModelConfig(pretrained=f"hf:{tmp_path / 'hf'}"))
    with torch.no_grad():
        bundle.model.visual.proj.mul_(2.0)  # "training" changed the weights
    run = tmp_path / "run"
    save_config(Config(model=ModelConfig(pretrained=f"hf:{tmp_path / 'hf'}"), data=DataConfig(source="synthetic"),
                       train=TrainConfig(steps=1)), run / "config.yaml")
    torch.save(bundle.model.state_dict(), run / "model.pt")
    assert torch.equal(load_model(str(run)).model.visual.proj, bundle.model.visual.proj)
    shutil.rmtree(tmp_path / "hf")
    with pytest.raises(ModelLoadError, match="defines its architecture and cannot be read now"):
        load_model(str(run))
    save_model_config(bundle, run)
    assert torch.equal(load_model(str(run)).model.visual.proj, bundle.model.visual.proj)


def test_export_to_hf_with_tokenizer(tmp_path: Path):
    bundle = load_model("orbit-micro")
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    hc.save_hf_clip(bundle.model, bundle.model_cfg, tmp_path / "out", mean=bundle.mean, std=bundle.std)
    hf = CLIPModel.from_pretrained(tmp_path / "out").eval()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "out")
    texts = ["An airport with 3 planes!", "dense residential area", "a river"]
    hf_ids = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    oc_ids = bundle.tokenizer(texts)
    for h, o in zip(hf_ids, oc_ids):
        n = int((o != 0).sum())
        assert torch.equal(h[:n], o[:n])  # same ids; HF pads with EOT, open_clip with 0
    with torch.no_grad():
        torch.testing.assert_close(hf.get_text_features(input_ids=hf_ids).pooler_output,
                                   bundle.model.encode_text(oc_ids), **TOL)
    assert load_model(f"hf:{tmp_path / 'out'}").mean == bundle.mean


def test_unsupported_inputs_are_refused(tmp_path: Path):
    siglip_like = build_model(ModelConfig(name="orbit-micro", init_logit_bias=-10.0))
    with pytest.raises(hc.ConversionError, match="logit_bias"):
        hc.open_clip_to_hf_model(siglip_like.model, siglip_like.model_cfg)
    cfg = open_clip.get_model_config("orbit-micro")
    cfg["vision_cfg"].update(attentional_pool=True, pool_type="avg")
    cfg["text_cfg"]["proj_bias"] = True
    expected = "vision_cfg.attentional_pool.*vision_cfg.pool_type.*text_cfg.proj_bias"
    with pytest.raises(hc.ConversionError, match=expected):
        hc.hf_config_from_open_clip(cfg)
    mixed = _hf_model()
    mixed.config.text_config.hidden_act = "gelu"
    with pytest.raises(hc.ConversionError, match="one activation"):
        hc.open_clip_config_from_hf(mixed.config)
    with pytest.raises(hc.ConversionError, match="no open_clip counterpart.*extra.weight"):
        hc.hf_to_open_clip_state_dict({**mixed.state_dict(), "extra.weight": torch.zeros(1)})
    _hf_model().save_pretrained(tmp_path / "small-vocab")  # vocab 1000: not CLIP's BPE
    with pytest.raises(ModelLoadError, match="CLIP BPE"):
        load_model(f"hf:{tmp_path / 'small-vocab'}")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(f"hf:{tmp_path / 'nowhere'}")
