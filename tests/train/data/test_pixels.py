"""Batches travel as uint8 and are normalized on the device: the same values as host
normalization, a quarter of the host memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from shards.synthetic import render_scene

from train.core.config import AugmentConfig, Config, load_config
from train.core.distenv import DistEnv
from train.core.rng import stable_seed
from train.data import build_train_loader
from train.data.augment import PixelNormalizer
from train.data.batch import Batch
from train.engines import EngineParts, build_engine
from train.loop.plan import LiveBytes
from train.model import build_model, pixel_stats
from train.optim import build_optimizer

from tests.train.data.test_shard_loader import CharTokenizer

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def synthetic(batch: int, size: int = 32, **data) -> object:
    cfg = Config()
    aug = AugmentConfig(color_jitter=0.4, hue_jitter=0.05)
    d = dataclasses.replace(cfg.data, source="synthetic", batch_size=batch, synthetic_samples=max(64, batch),
                            synthetic_image_size=40, augment=aug, **data)
    return build_train_loader(d, 3, DistEnv(), CharTokenizer(), size, MEAN, STD)


def test_device_normalization_is_bitwise_the_host_normalization():
    loader = synthetic(16)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.uint8
    on_device = PixelNormalizer(MEAN, STD)(batch.images)
    for row in range(16):
        image = render_scene(row, seed=loader.seed, size=loader.render_size).image  # fresh, not the cache
        host = loader.transform.seeded(image, stable_seed("synthetic-augment", loader.seed, row))
        assert torch.equal(on_device[row], host), row
    floats = torch.randn(2, 3, 4, 4)
    assert PixelNormalizer(MEAN, STD)(floats) is floats, "normalized inputs pass through"


@pytest.mark.parametrize("accum", [1, 2])
def test_a_uint8_batch_trains_bitwise_like_its_normalized_float_batch(accum):
    cfg = load_config(None, ["model.name=orbit-micro", "data.batch_size=8", f"train.accum_steps={accum}",
                             "train.precision=fp32", "train.steps=2", "data.source=synthetic"])
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    params = []
    for as_float in (False, True):
        torch.manual_seed(0)
        bundle = build_model(cfg.model)
        opt = build_optimizer(bundle.model, cfg.optim)
        engine = build_engine("ddp", EngineParts.from_config(cfg, bundle.model, opt, None, DistEnv(), "cpu"))
        texts = bundle.tokenizer([f"scene {i}" for i in range(8)])
        images = PixelNormalizer(bundle.mean, bundle.std)(pixels) if as_float else pixels
        for _ in range(2):
            engine.step(Batch(images.clone(), texts, [str(i) for i in range(8)]))
        params.append([p.detach().clone() for p in bundle.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_uint8_without_the_models_statistics_is_refused():
    from train.objective.forward import ForwardOptions

    with pytest.raises(ValueError, match="normalize"):
        ForwardOptions(torch.device("cpu")).to_device(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 2))
    assert pixel_stats(torch.nn.Linear(2, 2)) is None


def test_the_loader_builds_one_uint8_batch_and_nothing_bigger():
    """Peak torch memory while the loader makes a batch: the uint8 batch itself, not float32
    copies of it (formerly a list of float images plus their stack: 8x the uint8 batch)."""
    loader = synthetic(256)
    it = iter(loader)
    next(it)  # scenes rendered and cached (a numpy slab, not torch memory)
    counter = LiveBytes()
    with counter:
        batch = next(it)
    batch_bytes = batch.images.untyped_storage().nbytes() + batch.texts.untyped_storage().nbytes()
    assert batch.images.untyped_storage().nbytes() == 256 * 3 * 32 * 32
    assert max(counter.peak.values()) <= 1.1 * batch_bytes, (max(counter.peak.values()), batch_bytes)
