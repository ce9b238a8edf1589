"""Augmentations for overhead imagery, and the deterministic synthetic source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.augment import apply_seeded, build_eval_transform, build_train_transform
from train.core.config import AugmentConfig, Config
from train.data import build_train_loader
from train.core.distenv import DistEnv

from tests.train.data.test_shard_loader import CharTokenizer, decode_texts

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def image(h: int = 40, w: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in (x, x.flip(-1)):
        out += [torch.rot90(t, k, dims=(-2, -1)) for k in range(4)]
    return out


def test_train_transform_shapes_ranges_and_seeding():
    t = build_train_transform(AugmentConfig(color_jitter=0.4, hue_jitter=0.05), 32, MEAN, STD)
    outs = [apply_seeded(t, image(), s) for s in range(6)]
    lo = (0 - torch.tensor(MEAN).max()) / torch.tensor(STD).min()
    hi = (1 - torch.tensor(MEAN).min()) / torch.tensor(STD).min()
    for o in outs:
        assert o.shape == (3, 32, 32) and o.dtype == torch.float32 and torch.isfinite(o).all()
        assert lo - 1e-4 <= o.min() and o.max() <= hi + 1e-4
    assert torch.equal(apply_seeded(t, image(), 3), outs[3]), "same seed, same augmentation"
    assert len({o.sum().item() for o in outs}) == 6, "different seeds must differ"
    before = torch.get_rng_state()
    apply_seeded(t, image(), 9)
    assert torch.equal(before, torch.get_rng_state()), "global RNG must be left alone"


def test_eval_transform_and_disabled_augmentation_are_plain():
    ev = build_eval_transform(32, MEAN, STD)
    ref = ev(image())
    assert ref.shape == (3, 32, 32)
    off = build_train_transform(AugmentConfig(enabled=False), 32, MEAN, STD)
    for s in range(3):
        assert torch.equal(apply_seeded(off, image(), s), ref)
    # Flips/rotations only: every output is one of the 8 symmetries of the plain image.
    geo = build_train_transform(AugmentConfig(random_resized_crop=False), 32, MEAN, STD)
    seen = set()
    for s in range(24):
        o = apply_seeded(geo, image(), s)
        match = [i for i, d in enumerate(dihedral(ref)) if torch.equal(o, d)]
        assert match, "geometric augmentation must be lossless flips/rot90"
        seen.add(match[0])
    assert len(seen) >= 5


def synthetic_cfg(batch: int, augment: bool, n: int = 48) -> Config:
    cfg = Config()
    cfg.train.steps, cfg.train.seed = 10, 7
    cfg.data.source, cfg.data.synthetic_samples, cfg.data.synthetic_image_size = "synthetic", n, 32
    cfg.data.batch_size = batch
    cfg.data.augment.enabled = augment
    return cfg


def synthetic(batch: int, augment: bool, rank: int = 0, world: int = 1):
    cfg = synthetic_cfg(batch, augment)
    return build_train_loader(cfg.data, cfg.train.seed, DistEnv(rank=rank, world_size=world),
                              CharTokenizer(), 32, MEAN, STD)


@pytest.mark.parametrize("augment", [False, True])
def test_synthetic_batches_do_not_depend_on_the_cut(augment):
    full = synthetic(8, augment)
    ranks = [synthetic(4, augment, r, 2) for r in range(2)]
    assert full.steps_per_epoch == ranks[0].steps_per_epoch == 6
    its, full_it = [iter(x) for x in ranks], iter(full)
    for _ in range(8):  # crosses the epoch boundary
        whole, parts = next(full_it), [next(i) for i in its]
        assert whole.keys == parts[0].keys + parts[1].keys
        assert torch.equal(whole.images, torch.cat([p.images for p in parts]))
        assert torch.equal(whole.texts, torch.cat([p.texts for p in parts]))
    assert whole.keys[0] == "syn-56" and full.epoch == 1


def test_synthetic_resume_and_captions_vary_by_epoch():
    dl = synthetic(8, augment=True)
    it = iter(dl)
    ref = [next(it) for _ in range(5)]
    state = dl.state_dict()
    after = [next(it) for _ in range(7)]  # ends in epoch 1 (6 steps per epoch)
    again = synthetic(8, augment=True)
    again.load_state_dict(state)
    for x, y in zip(after, iter(again)):
        assert x.keys == y.keys and torch.equal(x.images, y.images) and torch.equal(x.texts, y.texts)
    caps = {}
    for b in ref + after:
        for k, t in zip(b.keys, decode_texts(b.texts)):
            caps.setdefault(int(k[4:]) % 48, []).append(t)
    assert sum(len(set(v)) > 1 for v in caps.values() if len(v) > 1) >= 6
    assert dl.wait_seconds > 0
    with pytest.raises(ValueError, match="synthetic"):
        again.load_state_dict({"kind": "shards"})
