"""Deterministic in-memory training source (``data.source: synthetic``).

Global sample ``i`` is ``shards.synthetic.render_scene(i % synthetic_samples,
seed=train.seed, size=synthetic_image_size)``, its caption drawn from (seed, i) and,
with augmentation on, its augmentation seeded from (seed, i). The global batch of step
``t`` is samples ``[t*G, (t+1)*G)`` with ``G = batch_size x world``; rank ``r`` takes
``[t*G + r*B, t*G + (r+1)*B)``. So a sample never depends on how the batch is cut,
which is what the distributed-equivalence tests rely on. Position = next step.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from train.data.augment import Transform, seeded_pixels
from train.core.config import DataConfig
from train.core.configbase import ConfigError
from train.data.batch import Batch, Tokenizer, TrainLoader
from train.core.distenv import DistEnv
from train.core.rng import stable_seed


def _render_scene():
    # Imported lazily: the shards package is optional for everything else in train.
    from shards.synthetic import render_scene

    return render_scene


def cache_bytes(data: DataConfig, image_size: int) -> int:
    """Pixel bytes the source keeps for its whole run: every scene at ``synthetic_image_size``
    (RGB), and with augmentation off also its fixed uint8 input at ``image_size``."""
    per_scene = 3 * data.synthetic_image_size ** 2 + (0 if data.augment.enabled else 3 * image_size ** 2)
    return data.synthetic_samples * per_scene


class SyntheticTrainLoader(TrainLoader):
    """Fixed-function batches from procedurally rendered scenes, cached in memory."""

    def __init__(self, data: DataConfig, seed: int, env: DistEnv, tokenizer: Tokenizer, transform: Transform) -> None:
        super().__init__()
        d = data
        self.n = d.synthetic_samples
        self.render_size = d.synthetic_image_size
        self.seed = seed
        self.batch_size, self.rank, self.world = d.batch_size, env.rank, env.world_size
        self.global_batch = self.batch_size * self.world
        self.samples_per_epoch = self.n
        self.steps_per_epoch = self.n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.synthetic_samples={self.n} is smaller than one global batch ({self.global_batch})")
        self.augment = d.augment.enabled
        self.caption_mode = d.caption_sampling
        self.tokenizer, self.transform = tokenizer, transform
        self._render = _render_scene()
        # The scene cache is two uint8 slabs (pages become resident as scenes are rendered) and
        # interned caption tuples: a PIL image and list per scene cost 2-3x its pixels.
        self._pixels: np.ndarray | None = None
        self._fixed: torch.Tensor | None = None
        self._captions: list[tuple[str, ...] | None] = [None] * self.n
        self._interned: dict[str, str] = {}
        self._tokens: dict[str, torch.Tensor] = {}
        self.step = 0

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.step = epoch * self.steps_per_epoch

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "step": self.step, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "synthetic" or (state["n"], state["seed"]) != (self.n, self.seed):
            raise ValueError(f"not a state of this synthetic source (n={self.n}, seed={self.seed}): {state}")
        self.step = int(state["step"])

    def _scene(self, base: int) -> tuple[tuple[str, ...], object | None]:
        """Scene ``base``'s captions, and its image when one is made: with augmentation off the
        fixed input is cached instead (:meth:`sample` reads it from the slab)."""
        image = None
        if self._captions[base] is None:
            s = self._render(base, seed=self.seed, size=self.render_size)
            if self._pixels is None:  # numpy: reading a scene back is no torch op (nor a tensor view)
                self._pixels = np.empty((self.n, self.render_size, self.render_size, 3), dtype=np.uint8)
            self._pixels[base] = np.asarray(s.image)
            if not self.augment:
                fixed = seeded_pixels(self.transform, s.image, 0)
                if self._fixed is None:
                    self._fixed = torch.empty((self.n, *fixed.shape), dtype=fixed.dtype)
                self._fixed[base] = fixed
            self._captions[base] = tuple(self._interned.setdefault(c, c) for c in s.captions)
            image = s.image
        elif self.augment:
            image = Image.fromarray(self._pixels[base], "RGB")  # the rendered pixels, bit for bit
        return self._captions[base], image

    def sample(self, i: int) -> tuple[torch.Tensor, str]:
        """Image tensor (uint8 pixels, see :func:`seeded_pixels`) and caption of global sample ``i``."""
        base = i % self.n
        captions, image = self._scene(base)
        if self.caption_mode == "first":
            caption = captions[0]
        else:
            caption = captions[random.Random(stable_seed("synthetic-caption", self.seed, i)).randrange(len(captions))]
        if not self.augment:
            return self._fixed[base], caption
        return seeded_pixels(self.transform, image, stable_seed("synthetic-augment", self.seed, i)), caption

    def _tokens_of(self, caption: str) -> torch.Tensor:
        if caption not in self._tokens:
            self._tokens[caption] = self.tokenizer([caption])[0]
        return self._tokens[caption]

    def _batches(self) -> Iterator[Batch]:
        while True:
            first = self.step * self.global_batch + self.rank * self.batch_size
            idx = range(first, first + self.batch_size)
            images, captions = None, []
            for row, i in enumerate(idx):  # each sample written into its row: no second copy of the batch
                x, caption = self.sample(i)
                if images is None:
                    images = torch.empty((self.batch_size, *x.shape), dtype=x.dtype)
                images[row] = x
                captions.append(caption)
            batch = Batch(images, torch.stack([self._tokens_of(c) for c in captions]), [f"syn-{i}" for i in idx])
            self.step += 1
            yield batch
