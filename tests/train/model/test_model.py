"""train.model.factory: every loading path on checkpoints written in the real formats, LiT locks,
patch dropout, gradient checkpointing and the error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.core.config import Config, DataConfig, ModelConfig, RunConfig, TrainConfig, save_config
from train.model.factory import (
    ClipBundle,
    ModelLoadError,
    build_model,
    load_model,
    save_local_dir,
)

ARCH = "orbit-micro"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-default values everywhere (biases, norms) so a wrong mapping cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _features(bundle: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randn(2, 3, bundle.image_size, bundle.image_size)
    texts = bundle.tokenizer(["a field of wheat", "a harbour with boats"])
    bundle.model.eval()
    with torch.no_grad():
        return bundle.model.encode_image(images), bundle.model.encode_text(texts)


@pytest.fixture(scope="module")
def source() -> ClipBundle:
    """A micro model with distinctive weights, including a logit_bias."""
    bundle = build_model(ModelConfig(name=ARCH, init_logit_bias=-10.0))
    _randomize(bundle.model, seed=1)
    return bundle


def test_random_init_bundle_is_complete():
    from PIL import Image

    b = load_model(ARCH)
    assert b.arch == ARCH and b.image_size == 32 and len(b.mean) == len(b.std) == 3
    assert not b.model.training
    tokens = b.tokenizer(["a river", "fields"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    x = b.eval_transform(Image.new("RGB", (70, 50), (200, 10, 10)))
    assert x.shape == (3, 32, 32)
    img, txt = _features(b)
    assert img.shape == txt.shape == (2, 32)


def test_tiny_configs_registered():
    for arch, grid in (("orbit-tiny", 4), ("orbit-tiny-p8", 8)):
        m = load_model(arch).model
        assert m.visual.positional_embedding.shape == (grid * grid + 1, 128)
        assert m.text_projection.shape == (128, 128) and m.context_length == 32


@pytest.mark.parametrize("fmt", ["state_dict_key", "raw", "safetensors"])
def test_arch_colon_file(tmp_path: Path, source: ClipBundle, fmt: str):
    sd = source.model.state_dict()
    if fmt == "safetensors":
        import safetensors.torch

        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save({"state_dict": sd, "epoch": 3} if fmt == "state_dict_key" else sd, path)
    loaded = load_model(f"{ARCH}:{path}")
    _assert_same_weights(loaded.model, source.model)
    assert loaded.model.logit_bias is not None  # created because the checkpoint has one


def test_local_dir_round_trip(tmp_path: Path, source: ClipBundle):
    folder = save_local_dir(source, tmp_path / "export")
    data = json.loads((folder / "open_clip_config.json").read_text())
    assert data["model_cfg"]["init_logit_bias"] == -10.0 and data["orbitclip"]["arch"] == ARCH
    loaded = load_model(f"local-dir:{folder}")
    _assert_same_weights(loaded.model, source.model)
    assert loaded.arch == ARCH and loaded.mean == source.mean and loaded.image_size == 32
    for a, b in zip(_features(loaded), _features(source)):
        torch.testing.assert_close(a, b)


def _write_run(run_dir: Path, source: ClipBundle, step: str = "step_0000100", wrap: bool = False) -> Path:
    cfg = Config(run=RunConfig(name=run_dir.name, root=str(run_dir.parent)),
                 model=ModelConfig(name=ARCH, init_logit_bias=-10.0),
                 data=DataConfig(source="synthetic"), train=TrainConfig(steps=1))
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    ckpt = run_dir / "checkpoints" / step
    ckpt.mkdir(parents=True)
    sd = {k: v.clone() for k, v in source.model.state_dict().items()}
    torch.save({"state_dict": sd} if wrap else sd, ckpt / "model.pt")
    (run_dir / "checkpoints" / "latest").write_text(step + "\n")
    return ckpt / "model.pt"


def test_run_dir_uses_latest_checkpoint(tmp_path: Path, source: ClipBundle):
    run = tmp_path / "run1"
    _write_run(run, source)
    # an older checkpoint with other weights must be ignored: `latest` decides
    old = run / "checkpoints" / "step_0000050"
    old.mkdir()
    torch.save({k: torch.zeros_like(v) for k, v in source.model.state_dict().items()}, old / "model.pt")
    loaded = load_model(str(run))
    _assert_same_weights(loaded.model, source.model)
    assert loaded.arch == ARCH


def test_checkpoint_file_and_step_folder_inside_run(tmp_path: Path, source: ClipBundle):
    model_file = _write_run(tmp_path / "run2", source, wrap=True)
    _assert_same_weights(load_model(str(model_file)).model, source.model)
    _assert_same_weights(load_model(str(model_file.parent)).model, source.model)


def test_tag_path_goes_through_open_clip(tmp_path: Path, source: ClipBundle, monkeypatch):
    """No downloads here: open_clip's tag lookup/download are pointed at a local file."""
    import open_clip.factory as factory

    path = tmp_path / "tagged.pt"
    sd = {k: v for k, v in source.model.state_dict().items() if k != "logit_bias"}
    torch.save(sd, path)
    monkeypatch.setattr(factory, "get_pretrained_cfg",
                        lambda arch, tag: {"url": "x", "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5)}
                        if (arch, tag) == (ARCH, "fake-tag") else {})
    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, cache_dir=None: str(path))
    b = load_model(f"{ARCH}:fake-tag")
    assert torch.equal(b.model.visual.proj, source.model.visual.proj)
    assert b.mean == (0.1, 0.2, 0.3)  # the tag's preprocessing is used
    # training from a CLIP tag with a SigLIP bias keeps the configured init, not open_clip's 0
    t = build_model(ModelConfig(name=ARCH, pretrained="fake-tag", init_logit_bias=-7.0))
    assert float(t.model.logit_bias.detach()) == -7.0
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint file nor an open_clip"):
        load_model(f"{ARCH}:no-such-tag")


def test_errors_are_clear(tmp_path: Path, source: ClipBundle):
    with pytest.raises(ModelLoadError, match="unknown architecture 'orbit-mikro'.*orbit-micro"):
        load_model("orbit-mikro")
    with pytest.raises(FileNotFoundError, match="no such run directory or checkpoint file"):
        load_model(str(tmp_path / "missing" / "model.pt"))
    # micro weights into the tiny architecture: the message lists the mis-shaped keys
    path = tmp_path / "micro.pt"
    torch.save(source.model.state_dict(), path)
    mismatch = r"shape mismatch \(\d+\): ln_final.bias \(32,\) vs model \(128,\)"
    with pytest.raises(ModelLoadError, match=mismatch) as err:
        load_model(f"orbit-tiny:{path}")
    assert "missing (" in str(err.value)  # tiny has more layers than micro
    # a checkpoint's logit_bias is not silently dropped when training without one
    with pytest.raises(ModelLoadError, match="(?s)unexpected.*logit_bias.*init_logit_bias"):
        build_model(ModelConfig(name=ARCH, pretrained=str(path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text(json.dumps({"model_cfg": source.model_cfg}))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_model(f"local-dir:{empty}")
    with pytest.raises(ModelLoadError, match="architecture is unknown"):
        load_model(str(empty))
    run = tmp_path / "run-no-ckpt"
    _write_run(run, source)
    (run / "checkpoints" / "latest").write_text("step_0000999")
    with pytest.raises(FileNotFoundError, match="names 'step_0000999'"):
        load_model(str(run))
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"a": 1}}, bad)
    with pytest.raises(ModelLoadError, match="non-tensor entries: a"):
        load_model(f"{ARCH}:{bad}")


def test_build_model_pretrained_file_with_overrides(tmp_path: Path, source: ClipBundle):
    path = tmp_path / "w.pt"
    torch.save(source.model.state_dict(), path)
    b = build_model(ModelConfig(name=ARCH, pretrained=str(path), init_logit_bias=-10.0, init_logit_scale=1.5))
    assert b.model.training
    _assert_same_weights(b.model, source.model)  # loaded weights replace the init values
    fresh = build_model(ModelConfig(name=ARCH, init_logit_scale=1.5, init_logit_bias=-3.0))
    assert float(fresh.model.logit_scale.detach()) == 1.5 and float(fresh.model.logit_bias.detach()) == -3.0
    assert build_model(ModelConfig(name=ARCH)).model.logit_bias is None
    # image size override: 48 px -> 6x6 grid, position table interpolated from the 4x4 checkpoint
    big = build_model(ModelConfig(name=ARCH, pretrained=str(path), image_size=48, init_logit_bias=-10.0))
    assert big.image_size == 48 and big.model.visual.positional_embedding.shape == (37, 32)
    assert torch.equal(big.model.visual.positional_embedding[0], source.model.visual.positional_embedding[0])
    assert big.eval_transform(__import__("PIL.Image").Image.new("RGB", (60, 60))).shape == (3, 48, 48)


def test_build_model_from_run_dir_and_local_dir(tmp_path: Path, source: ClipBundle):
    _write_run(tmp_path / "run3", source)
    b = build_model(ModelConfig(name=ARCH, pretrained=str(tmp_path / "run3"), init_logit_bias=-10.0))
    _assert_same_weights(b.model, source.model)
    with pytest.raises(ModelLoadError, match="trained 'orbit-micro'"):
        build_model(ModelConfig(name="orbit-tiny", pretrained=str(tmp_path / "run3")))
    folder = save_local_dir(source, tmp_path / "ld")
    b2 = build_model(ModelConfig(pretrained=f"local-dir:{folder}", lock_text=True))
    _assert_same_weights(b2.model, source.model)
    assert not b2.model.text_projection.requires_grad


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lit_lock_image_tower():
    all_names = {n for n, _ in build_model(ModelConfig(name=ARCH)).model.named_parameters()}
    visual = {n for n in all_names if n.startswith("visual.")}
    assert _trainable(build_model(ModelConfig(name=ARCH, lock_image=True)).model) == all_names - visual
    # groups from the end: [proj], [last block + ln_post], [block 0], [stem]
    one = build_model(ModelConfig(name=ARCH, lock_image=True, lock_image_unlocked_groups=1)).model
    assert _trainable(one) == (all_names - visual) | {"visual.proj"}
    two = build_model(ModelConfig(name=ARCH, lock_image=True, lock_image_unlocked_groups=2)).model
    expected = {n for n in visual if n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))}
    assert _trainable(two) == (all_names - visual) | {"visual.proj"} | expected


def test_lit_lock_text_tower():
    model = build_model(ModelConfig(name=ARCH, lock_text=True)).model
    all_names = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == {n for n in all_names if n.startswith("visual.")} | {"logit_scale"}
    one = build_model(ModelConfig(name=ARCH, lock_text=True, lock_text_unlocked_layers=1)).model
    assert _trainable(one) - _trainable(model) == {"text_projection"}
    both = build_model(ModelConfig(name=ARCH, lock_text=True, lock_image=True)).model
    assert _trainable(both) == {"logit_scale"}


def test_patch_dropout_only_in_train_mode():
    b = build_model(ModelConfig(name=ARCH, patch_dropout=0.5))
    seen: list[int] = []
    b.model.visual.transformer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    b.model.train()
    b.model.encode_image(x)
    b.model.eval()
    with torch.no_grad():
        out1 = b.model.encode_image(x)
        out2 = b.model.encode_image(x)
    assert seen == [1 + 8, 1 + 16, 1 + 16]  # class token + half of the 16 patches in training
    torch.testing.assert_close(out1, out2)
    with pytest.raises(ModelLoadError, match="patch_dropout"):
        build_model(ModelConfig(name=ARCH, patch_dropout=1.0))


def test_grad_checkpointing_same_gradients(monkeypatch):
    import open_clip.transformer as oct

    calls = []
    real = oct.checkpoint
    monkeypatch.setattr(oct, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = build_model(ModelConfig(name=ARCH))
    _randomize(plain.model, seed=3)
    ckpt = build_model(ModelConfig(name=ARCH, grad_checkpointing=True))
    ckpt.model.load_state_dict(plain.model.state_dict())
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    t = plain.tokenizer(["one", "two", "three"])
    grads = []
    for b in (plain, ckpt):
        b.model.zero_grad()
        img, txt = b.model.encode_image(x, normalize=True), b.model.encode_text(t, normalize=True)
        (b.model.logit_scale.exp() * img @ txt.T).logsumexp(1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None})
    assert len(calls) == 3  # 2 vision + 1 text blocks ran under checkpoint, plain ran none
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_random_init_for_eval_is_reproducible_and_leaves_global_rng_alone():
    from train.model.factory import load_model

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("orbit-micro").model.state_dict()
    after = torch.rand(1)
    b = load_model("orbit-micro").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(before, after)
