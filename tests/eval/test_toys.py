"""Toy models and tiny shards for the eval tests (helpers only, no tests; no open_clip needed)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from PIL import Image

NUM_CLASSES = 4
ID_DIMS = 64  # one dimension per image id (toy retrieval)


def write_shards(out: Path, splits: dict[str, int], num_classes: int = NUM_CLASSES) -> Path:
    """DESIGN.md-format shards: image i of a split has class i % C; pixel (R, G) = (class, i)."""
    names = [f"class{c}" for c in range(num_classes)]
    for split, n in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(out / split / f"{split}-000000.tar")) as tw:
            for i in range(n):
                c = i % num_classes
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (c * 10, i, 0)).save(buf, "PNG")  # lossless: pixels survive
                caps = [f"class{c} item{i}", f"a view of class{c} item{i}"]
                meta = {"key": f"{split}{i:04d}", "captions": caps, "label": c, "classname": names[c],
                        "source": f"{names[c]}/{names[c]}_{i}.png", "split": split}
                tw.write({"__key__": f"{split}{i:04d}", "png": buf.getvalue(), "txt": caps[0],
                          "json": json.dumps(meta).encode()})
        (out / split / "sizes.json").write_text(json.dumps({f"{split}-000000.tar": n}))
    (out / "manifest.json").write_text(json.dumps({"classnames": names, "templates": ["a photo of {}."]}))
    return out


def write_benchmark(path: Path, shards: Path, **extra) -> Path:
    """A benchmark YAML on toy shards (evaluators and overrides via ``extra``)."""
    spec = {"data": {"kind": "shards", "path": str(shards), "split": "test"},
            "templates": ["a photo of {}.", "{} from above"],
            "evaluators": {"zeroshot": {"ks": [1, 2, 4, 10]}}}
    for k, v in extra.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) and k == "data" else v
    path.write_text(yaml.safe_dump(spec))
    return path


class ToyModel(torch.nn.Module):
    """Image/text features from (class, id) decoded from the pixel / the text.

    mode ``perfect``: image = one-hot(class) + one-hot(id), text = one-hot(class) [+ one-hot(id)].
    mode ``random``: image features are seeded noise (chance level).
    mode ``constant``: every feature is the same vector (all scores tie).
    """

    def __init__(self, mode: str = "perfect") -> None:
        super().__init__()
        self.mode = mode
        self.dim = NUM_CLASSES + ID_DIMS
        self.gen = torch.Generator().manual_seed(0)  # fresh noise per call, same sequence per model

    def _vec(self, cls: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        v = F.one_hot(cls, self.dim).float()
        has_id = ids >= 0
        v[has_id] += F.one_hot(NUM_CLASSES + ids[has_id] % ID_DIMS, self.dim).float()
        return v

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        cls, ids = x[:, 0].long(), x[:, 1].long()
        if self.mode == "random":
            return torch.randn(len(x), self.dim, generator=self.gen)
        if self.mode == "constant":
            return torch.ones(len(x), self.dim)
        return self._vec(cls, ids)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":
            return torch.ones(len(tokens), self.dim)
        return self._vec(tokens[:, 0], tokens[:, 1])


def toy_tokenizer(texts: list[str]) -> torch.Tensor:
    out = []
    for t in texts:
        c = re.search(r"class(\d+)", t)
        i = re.search(r"item(\d+)", t)
        out.append([int(c.group(1)) if c else 0, int(i.group(1)) if i else -1])
    return torch.tensor(out)


def toy_transform(im: Image.Image) -> torch.Tensor:
    r, g, _ = im.getpixel((0, 0))
    return torch.tensor([r // 10, g], dtype=torch.float32)


class ToyBundle:
    """Duck-typed ClipBundle."""

    def __init__(self, mode: str = "perfect") -> None:
        self.model = ToyModel(mode)
        self.tokenizer = toy_tokenizer
        self.eval_transform = toy_transform
        self.arch = f"toy-{mode}"
