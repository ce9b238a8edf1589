"""The webdataset training loader: layouts, splitting, determinism, exact resume, mixing."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from train.core.config import Config, ShardSourceConfig
from train.data import build_train_loader
from train.core.distenv import DistEnv
from train.data.shards.index import ShardIndexError, discover_source

CTX = 24
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class CharTokenizer:
    """Invertible toy tokenizer (picklable, so it runs in DataLoader workers)."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), CTX, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) for c in t[:CTX]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def decode_texts(texts: torch.Tensor) -> list[str]:
    return ["".join(chr(int(c)) for c in row if c) for row in texts]


def jpeg(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(root: Path, sizes: list[int], *, prefix: str = "k", captions: int = 3,
                 corrupt: tuple[str, ...] = (), uncaptioned: tuple[str, ...] = ()) -> Path:
    """A `shards`-format output folder (DESIGN.md): root/train/train-NNNNNN.tar + sizes.json."""
    split = root / "train"
    split.mkdir(parents=True)
    table = {}
    for si, n in enumerate(sizes):
        name = f"train-{si:06d}.tar"
        with wds.TarWriter(str(split / name)) as w:
            for j in range(n):
                key = f"{prefix}{si:02d}_{j:03d}"
                caps = [f"{key} c{c}" for c in range(captions)]
                sample = {"__key__": key, "jpg": b"\xff\xd8 not a jpeg" if key in corrupt else jpeg(si * 1000 + j),
                          "txt": caps[0], "json": {"key": key, "captions": caps, "label": None,
                                                  "classname": None, "source": f"{key}.jpg", "split": "train"}}
                if key in uncaptioned:
                    del sample["txt"]
                    sample["json"] = {"key": key, "captions": []}
                w.write(sample)
        table[name] = n
    (split / "sizes.json").write_text(json.dumps(table))
    return root


def make_cfg(paths: list[str], *, batch: int = 8, workers: int = 0, weights=None, **data) -> Config:
    cfg = Config()
    cfg.train.steps = 10
    cfg.data.shards = [ShardSourceConfig(path=p, weight=(weights or [1.0] * len(paths))[i]) for i, p in enumerate(paths)]
    cfg.data.batch_size, cfg.data.workers, cfg.data.shuffle_buffer = batch, workers, 16
    cfg.data.augment.color_jitter = 0.3
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def loader(cfg: Config, rank: int = 0, world: int = 1):
    return build_train_loader(cfg.data, cfg.train.seed, DistEnv(rank=rank, world_size=world), CharTokenizer(), 32, MEAN, STD)


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys
        assert torch.equal(x.texts, y.texts)
        assert torch.equal(x.images, y.images)


# -- layouts ---------------------------------------------------------------------------

def write_img2dataset(folder: Path, n: int, start: int = 0, stats: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{start // 100:05d}"
    with wds.TarWriter(str(folder / f"{name}.tar")) as w:
        for j in range(start, start + n):
            w.write({"__key__": f"{j:09d}", "jpg": jpeg(j), "txt": f"photo {j}",
                     "json": {"url": f"http://x/{j}.jpg", "key": f"{j:09d}", "status": "success"}})
    if stats:
        (folder / f"{name}_stats.json").write_text(json.dumps({"count": n + 2, "successes": n, "failed_to_download": 2}))


def test_discover_layouts_and_errors(tmp_path):
    root = write_shards(tmp_path / "out", [5, 7])
    s = discover_source(ShardSourceConfig(path=str(root)))
    assert s.sizes == (5, 7) and s.urls[0].endswith("train/train-000000.tar")
    pat = discover_source(ShardSourceConfig(path=str(root / "train" / "train-{000000..000001}.tar")))
    assert pat.sizes == (5, 7)
    write_img2dataset(tmp_path / "i2d", 6)
    write_img2dataset(tmp_path / "i2d", 4, start=100)
    assert discover_source(ShardSourceConfig(path=str(tmp_path / "i2d"))).sizes == (6, 4)
    write_img2dataset(tmp_path / "nostats", 3, stats=False)
    with pytest.raises(ShardIndexError, match="unknown sample count"):
        discover_source(ShardSourceConfig(path=str(tmp_path / "nostats")))
    with pytest.raises(ShardIndexError, match="do not exist"):
        discover_source(ShardSourceConfig(path=str(root / "train" / "train-{000000..000002}.tar")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardIndexError, match="no sizes.json"):
        discover_source(ShardSourceConfig(path=str(tmp_path / "empty")))
    # a missing folder says how to build it (the config's own command when it has one)
    with pytest.raises(ShardIndexError, match=r"absent not found; build them first: python -m shards build"):
        discover_source(ShardSourceConfig(path=str(tmp_path / "absent")))
    with pytest.raises(ShardIndexError, match=r"build them first: make-my-shards$"):
        discover_source(ShardSourceConfig(path=str(tmp_path / "absent"), build="make-my-shards"))


def test_img2dataset_layout_reads_txt_captions(tmp_path):
    write_img2dataset(tmp_path / "i2d", 10)
    write_img2dataset(tmp_path / "i2d", 6, start=100)
    cfg = make_cfg([str(tmp_path / "i2d")], batch=4, caption_sampling="random")
    dl = loader(cfg)
    assert (dl.samples_per_epoch, dl.steps_per_epoch, dl.stats["dropped_per_epoch"]) == (16, 4, 0)
    batches = take(iter(dl), 4)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted([f"{j:09d}" for j in range(10)] + [f"{j:09d}" for j in range(100, 106)])
    for b in batches:
        assert b.images.shape == (4, 3, 32, 32) and b.images.dtype == torch.uint8
        assert decode_texts(b.texts) == [f"photo {int(k)}" for k in b.keys]


# -- splitting -------------------------------------------------------------------------

def test_two_ranks_two_workers_cover_each_epoch_once(tmp_path):
    sizes = [37, 50, 13, 44, 26]  # 170 samples, uneven shards
    root = write_shards(tmp_path / "out", sizes)
    all_keys = {f"k{si:02d}_{j:03d}" for si, n in enumerate(sizes) for j in range(n)}
    cfg = make_cfg([str(root)], batch=8, workers=2)
    per_rank = []
    for rank in range(2):
        dl = loader(cfg, rank, 2)
        assert (dl.steps_per_epoch, dl.dropped_per_epoch) == (10, 170 - 160)
        per_rank.append([b.keys for b in take(iter(dl), 20)])  # two epochs
        assert dl.epoch == 2 and dl.wait_seconds > 0
    for epoch in range(2):
        seen = [k for r in range(2) for keys in per_rank[r][epoch * 10:(epoch + 1) * 10] for k in keys]
        assert len(seen) == 160 and len(set(seen)) == 160, "duplicates inside an epoch"
        assert set(seen) <= all_keys
    assert not set(sum(per_rank[0][:10], [])) & set(sum(per_rank[1][:10], []))
    assert per_rank[0][:10] != per_rank[0][10:], "epoch 1 must be reshuffled"


# -- determinism and exact resume --------------------------------------------------------

@pytest.mark.parametrize("workers,resampled", [(0, False), (2, False), (2, True)])
def test_resume_is_exact_at_any_batch(tmp_path, workers, resampled):
    root = write_shards(tmp_path / "out", [30, 25, 43], corrupt=("k01_004",))
    cfg = make_cfg([str(root)], batch=8, workers=workers, resampled=resampled)
    dl = loader(cfg)
    assert dl.steps_per_epoch == 12
    it, states, ref = iter(dl), [], []
    for _ in range(17):  # into the second epoch
        states.append(dl.state_dict())
        ref.append(next(it))
    same_batches(take(iter(loader(cfg)), 3), ref[:3])  # deterministic from scratch
    for pos in (1, 5, 11, 12, 14):
        fresh = loader(cfg)
        fresh.load_state_dict(states[pos])
        same_batches(take(iter(fresh), 3), ref[pos:pos + 3])
    if not resampled:  # the corrupt sample was met in epoch 0
        assert states[12]["epoch"] == 1 and states[12]["totals"]["skipped/decode_error"] == 1


def test_per_sample_randomness_does_not_depend_on_workers(tmp_path):
    root = write_shards(tmp_path / "out", [20, 12, 16])
    per = []
    for workers in (0, 2):
        batches = take(iter(loader(make_cfg([str(root)], batch=8, workers=workers))), 6)
        per.append({k: (b.images[i], b.texts[i]) for b in batches for i, k in enumerate(b.keys)})
    assert per[0].keys() == per[1].keys() and len(per[0]) == 48
    for k, (img, txt) in per[0].items():
        assert torch.equal(img, per[1][k][0]) and torch.equal(txt, per[1][k][1])


def test_resume_rejects_a_changed_plan(tmp_path):
    root = write_shards(tmp_path / "out", [20, 20])
    state = loader(make_cfg([str(root)], workers=0)).state_dict()
    with pytest.raises(ValueError, match="workers"):
        loader(make_cfg([str(root)], workers=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        loader(make_cfg([str(root)], batch=32), 0, 2)


# -- content -----------------------------------------------------------------------------

def test_mixing_follows_weights_and_counts_repeats(tmp_path):
    a = write_shards(tmp_path / "a", [30, 30], prefix="a")
    b = write_shards(tmp_path / "b", [20], prefix="b")
    cfg = make_cfg([str(a), str(b)], batch=16, weights=[3.0, 1.0], samples_per_epoch=320)
    dl = loader(cfg)
    keys = [k for batch in take(iter(dl), dl.steps_per_epoch) for k in batch.keys]
    share = Counter(k.split("/")[0] for k in keys)
    assert len(keys) == 320 and abs(share["0"] / 320 - 0.75) < 0.08, share
    assert all(k.split("/")[1].startswith("ab"[int(k[0])]) for k in keys)
    assert dl.stats["repeated"] > 0  # 20 samples of b drawn ~80 times


def test_caption_sampling_varies_by_epoch(tmp_path):
    root = write_shards(tmp_path / "out", [16], captions=4)
    for mode in ("random", "first"):
        dl = loader(make_cfg([str(root)], batch=8, caption_sampling=mode))
        seen: dict[str, set] = {}
        for b in take(iter(dl), 8):  # four epochs
            for k, t in zip(b.keys, decode_texts(b.texts)):
                assert t.startswith(k + " c")
                seen.setdefault(k, set()).add(t)
        if mode == "first":
            assert all(s == {f"{k} c0"} for k, s in seen.items())
        else:
            assert sum(len(s) > 1 for s in seen.values()) >= 12


def test_bad_samples_are_counted_not_fatal(tmp_path, caplog):
    root = write_shards(tmp_path / "out", [12, 12], corrupt=("k00_003",), uncaptioned=("k01_005",))
    dl = loader(make_cfg([str(root)], batch=4))
    keys = [k for b in take(iter(dl), 6) for k in b.keys]
    assert "k00_003" not in keys and "k01_005" not in keys
    assert dl.stats["skipped/decode_error"] == 1 and dl.stats["skipped/no_caption"] == 1
    assert len(set(keys)) == 22 and dl.stats["repeated"] == 2  # two slots refilled from the stream's range
    assert "skipping sample k00_003" in caplog.text


def test_cached_tokenizer_matches_and_tokenizes_each_caption_once():
    from train.data.batch import CachedTokenizer
    from train.model.factory import open_clip  # imported through the torchvision shim

    seen: list[str] = []
    base = open_clip.SimpleTokenizer(context_length=16)

    def counting(captions: list[str]):
        seen.extend(captions)
        return base(captions)

    tok = CachedTokenizer(counting, max_entries=3)
    batch = ["a lake.", "a forest.", "a lake.", "a road."]
    assert torch.equal(tok(batch), base(batch))
    assert seen == ["a lake.", "a forest.", "a road."]
    assert torch.equal(tok(["a road.", "a lake."]), base(["a road.", "a lake."]))
    assert len(seen) == 3  # all cached
    assert torch.equal(tok(["a river."]), base(["a river."]))  # over max_entries: cache reset, still right
    assert seen[-1] == "a river." and len(tok._cache) == 1
