"""``train.unique_texts``: encoding each distinct caption once must not change training.

Template captions repeat many times per batch (EuroSAT: 30 distinct captions in a
batch of 128). The engine then encodes the distinct rows and indexes them back; the
loss, gradients and parameters must equal the plain path's, on one process (plain
and feature cache) and on two gloo ranks with accumulation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distutil import run_distributed
from tests.train.engines.equiv_workers import make_model
from train.core.config import Config
from train.data.batch import Batch
from train.core.distenv import DistEnv
from train.engines import EngineParts, build_engine
from train.objective.forward import encode

GLOBAL_BATCH, STEPS, DISTINCT = 8, 3, 3


def dup_batch(step: int, rank: int, world: int, model: torch.nn.Module) -> Batch:
    """Rank ``rank``'s slice of a global batch whose 8 captions take only 3 values."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    ctx, vocab = model.context_length, model.vocab_size
    g = torch.Generator().manual_seed(500 + step)
    images = torch.randn(GLOBAL_BATCH, 3, size, size, generator=g)
    captions = torch.zeros(DISTINCT, ctx, dtype=torch.long)
    for c in range(DISTINCT):
        captions[c, : 4 + c] = torch.randint(1, vocab - 1, (4 + c,), generator=g)
        captions[c, 4 + c] = vocab - 1
    texts = captions[torch.arange(GLOBAL_BATCH) % DISTINCT]
    local = GLOBAL_BATCH // world
    rows = slice(rank * local, (rank + 1) * local)
    return Batch(images[rows], texts[rows], [str(i) for i in range(rank * local, (rank + 1) * local)])


def run(rank: int, world: int, init: dict, accum: int, unique: bool) -> dict | None:
    """Train ``STEPS`` SGD steps; rank 0 returns losses, first gradients and final parameters."""
    model = make_model("clip")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in init.items()})
    cfg = Config()
    cfg.train.accum_steps, cfg.train.precision, cfg.train.unique_texts = accum, "fp32", unique
    # SGD, not Adam: Adam rescales the float noise of exactly-zero gradients (attention key
    # biases) to full-size steps, which would hide the comparison behind noise.
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine = build_engine(cfg.train.engine, EngineParts.from_config(cfg, model, opt, None, DistEnv(rank=rank, world_size=world), "cpu"))
    losses, first_grads = [], None
    for t in range(STEPS):
        batch = dup_batch(t, rank, world, model)
        if first_grads is None:  # the gradient of step 0, read before the optimizer zeroes it
            orig_step = opt.step

            def spy(*a, **k):
                nonlocal first_grads
                first_grads = {n: p.grad.detach().clone().numpy() for n, p in model.named_parameters()
                               if p.grad is not None}
                return orig_step(*a, **k)

            opt.step = spy
            losses.append(float(engine.step(batch)["loss"]))
            opt.step = orig_step
        else:
            losses.append(float(engine.step(batch)["loss"]))
    if rank != 0:
        return None
    return {"loss": losses, "grads": first_grads,
            "params": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def init() -> dict:
    return {k: v.detach().numpy().copy() for k, v in make_model("clip").state_dict().items()}


@pytest.fixture(scope="module")
def reference(init) -> dict:
    return run(0, 1, init, 1, unique=False)


def assert_same(res: dict, ref: dict) -> None:
    np.testing.assert_allclose(res["loss"], ref["loss"], rtol=1e-5)
    assert res["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        np.testing.assert_allclose(res["grads"][name], g, rtol=1e-4, atol=1e-6 * (np.abs(g).max() + 1e-3), err_msg=name)
    for name, p in ref["params"].items():
        # per tensor, in norm: single elements carry float noise of summation order
        assert np.linalg.norm(res["params"][name] - p) <= 1e-5 * np.linalg.norm(p), name


def test_encode_really_encodes_each_caption_once():
    model = make_model("clip")
    batch = dup_batch(0, 0, 1, model)
    seen = []
    handle = model.token_embedding.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    full = encode(model, batch.images, batch.texts)
    once = encode(model, batch.images, batch.texts, unique_texts=True)
    handle.remove()
    assert seen == [GLOBAL_BATCH, DISTINCT]
    torch.testing.assert_close(once.text, full.text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_unique_texts_single_process_matches(reference, init, accum):
    assert_same(run(0, 1, init, accum, unique=True), reference)


def test_unique_texts_two_ranks_with_accumulation_matches(reference, init):
    assert_same(run_distributed(run, 2, init, 2, True)[0], reference)


def test_comparison_can_fail(reference, init):
    # A different caption assignment must be caught by the same comparison.
    res = run(0, 1, init, 1, unique=False)
    res["params"] = {k: v + 1e-3 for k, v in res["params"].items()}
    with pytest.raises(AssertionError):
        assert_same(res, reference)

