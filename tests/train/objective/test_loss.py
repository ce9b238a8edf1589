"""Loss values against hand-written references, the logit-scale clamp, and the
gather's backward in real gloo processes (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.distutil import run_distributed
from train.objective import gather
from train.core.config import LossConfig
from train.objective.loss import ClipLoss, SigLipLoss, build_loss, clamp_logit_scale_
from train.objective.tiled import TiledClipLoss, TiledSigLipLoss


def _features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def reference_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """CLIP loss written out with explicit loops over rows (float64)."""
    img, txt = img.double(), txt.double()
    n, total = img.shape[0], 0.0
    for i in range(n):
        row_i = [scale * float(img[i] @ txt[j]) for j in range(n)]
        row_t = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -row_i[i] + math.log(sum(math.exp(v) for v in row_i))
        total += -row_t[i] + math.log(sum(math.exp(v) for v in row_t))
    return total / (2 * n)


def reference_siglip(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> float:
    """SigLIP loss written out: -sum_ij log sigmoid(z_ij * logit_ij) / N (float64)."""
    img, txt = img.double(), txt.double()
    n, total = img.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += math.log1p(math.exp(-z * logit))
    return total / n


def test_clip_loss_matches_hand_written_reference():
    img, txt = _features(6)
    got = ClipLoss()(img, txt, torch.tensor(7.5))
    assert float(got) == pytest.approx(reference_clip(img, txt, 7.5), rel=1e-5)
    # A mismatched pairing must change the value: the reference is sensitive to labels.
    assert abs(reference_clip(img, txt.flip(0), 7.5) - float(got)) > 1e-2


def test_clip_loss_bias_is_softmax_invariant_but_in_graph():
    img, txt = _features(5)
    bias = torch.tensor(-3.0, requires_grad=True)
    with_bias = ClipLoss()(img, txt, torch.tensor(10.0), bias)
    assert float(with_bias.detach()) == pytest.approx(float(ClipLoss()(img, txt, torch.tensor(10.0))), rel=1e-6)
    with_bias.backward()
    assert bias.grad is not None and abs(float(bias.grad)) < 1e-6


def test_siglip_loss_matches_hand_written_reference():
    img, txt = _features(5, seed=1)
    got = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-2.0))
    assert float(got) == pytest.approx(reference_siglip(img, txt, 10.0, -2.0), rel=1e-5)


def test_losses_agree_with_open_clip_single_process():
    import train.core.compat

    train.core.compat.ensure_torchvision()
    from open_clip.loss import ClipLoss as OCClipLoss, SigLipLoss as OCSigLipLoss

    img, txt = _features(7, seed=2)
    scale, bias = torch.tensor(12.0), torch.tensor(-5.0)
    assert float(ClipLoss()(img, txt, scale)) == pytest.approx(float(OCClipLoss()(img, txt, scale)), rel=1e-6)
    assert float(SigLipLoss()(img, txt, scale, bias)) == pytest.approx(
        float(OCSigLipLoss()(img, txt, scale, bias)), rel=1e-6
    )


def test_siglip_without_bias_is_a_clear_error():
    img, txt = _features(3)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, torch.tensor(10.0), None)


def test_build_loss_kinds_are_tiled():
    clip = build_loss(LossConfig(kind="clip", block_size=16))
    assert isinstance(clip, TiledClipLoss) and clip.block_size == 16
    assert isinstance(build_loss(LossConfig(kind="siglip")), TiledSigLipLoss)
    with pytest.raises(ValueError, match="unknown loss.kind"):
        build_loss(LossConfig(kind="triplet"))  # type: ignore[arg-type]


def test_logit_scale_clamp():
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    clamp_logit_scale_(model, 100.0)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0))
    model.logit_scale.data.fill_(math.log(20.0))
    clamp_logit_scale_(model, 100.0)  # below the limit: untouched
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(20.0))
    with pytest.raises(ValueError):
        clamp_logit_scale_(model, 0.0)


def test_single_process_gather_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather.all_gather_with_grad(x) is x
    assert float(gather.mean_over_ranks(torch.tensor(2.5))) == 2.5


# ----------------------------------------------------------------------------- gloo

N_PER_RANK, DIM, SCALE, BIAS = 3, 4, 9.0, -2.0


def _global_features(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _features(world * N_PER_RANK, DIM, seed=5)


def _loss_worker(rank: int, world: int) -> dict:
    """Per rank: gather backward (with and without grad) and both losses' local part."""
    out: dict = {}
    # Gather: rank r weighs the gathered rows with W_r; rank q must receive sum_r W_r[q-rows].
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    w = torch.arange(world * 6, dtype=torch.float32).reshape(world * 2, 3) * (rank + 1)
    y = gather.all_gather_with_grad(x)
    out["gathered"] = y.detach().numpy()
    (y * w).sum().backward()
    out["grad_with"] = x.grad.numpy().copy()
    x.grad = None
    (gather.all_gather_no_grad(x) * w).sum().backward()
    out["grad_without"] = x.grad.numpy().copy()
    out["mean"] = float(gather.mean_over_ranks(torch.tensor(float(rank))))

    img_all, txt_all = _global_features(world)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    # Tiled with blocks of 2: blocks that straddle ranks' rows, a last block of 1 column.
    for name, loss_fn, bias in (("clip", ClipLoss(), None), ("siglip", SigLipLoss(), torch.tensor(BIAS)),
                                ("clip-tiled", TiledClipLoss(2), None),
                                ("siglip-tiled", TiledSigLipLoss(2), torch.tensor(BIAS))):
        img = img_all[rows].clone().requires_grad_()
        txt = txt_all[rows].clone().requires_grad_()
        scale = torch.tensor(SCALE, requires_grad=True)
        loss = loss_fn(img, txt, scale, bias)
        loss.backward()
        out[name] = {"loss": float(loss), "img_grad": img.grad.numpy().copy(),
                     "txt_grad": txt.grad.numpy().copy(), "scale_grad": float(scale.grad)}
    return out


@pytest.fixture(scope="module")
def gloo3() -> list[dict]:
    # Three ranks: an odd world catches off-by-one slicing that two ranks can hide.
    return run_distributed(_loss_worker, 3)


def test_gather_forward_and_backward_in_gloo(gloo3):
    world = len(gloo3)
    expected_rows = np.concatenate([np.full((2, 3), r + 1.0) for r in range(world)])
    base = np.arange(world * 6, dtype=np.float32).reshape(world * 2, 3)
    factor = sum(r + 1 for r in range(world))  # sum over ranks of each rank's weight multiplier
    for rank, out in enumerate(gloo3):
        np.testing.assert_array_equal(out["gathered"], expected_rows)
        np.testing.assert_allclose(out["grad_with"], factor * base[2 * rank: 2 * rank + 2], rtol=1e-6)
        # The broken gather sees only its own weight: must differ (this is what the test guards).
        np.testing.assert_allclose(out["grad_without"], (rank + 1) * base[2 * rank: 2 * rank + 2], rtol=1e-6)
        assert not np.allclose(out["grad_with"], out["grad_without"])
        assert out["mean"] == pytest.approx((world - 1) / 2)


@pytest.mark.parametrize("kind", ["clip", "siglip", "clip-tiled", "siglip-tiled"])
def test_distributed_loss_reproduces_full_batch_loss_and_gradient(gloo3, kind):
    """mean_r L_r == L and (1/W) * (feature / scale grads seen per rank) == full-batch grads."""
    world = len(gloo3)
    img = _global_features(world)[0].clone().requires_grad_()
    txt = _global_features(world)[1].clone().requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    # The ground truth is always the plain loss on one process.
    full = ClipLoss()(img, txt, scale) if kind.startswith("clip") else SigLipLoss()(img, txt, scale, torch.tensor(BIAS))
    full.backward()
    per_rank = [o[kind] for o in gloo3]
    assert np.mean([o["loss"] for o in per_rank]) == pytest.approx(float(full.detach()), rel=1e-6)
    # DDP averages parameter grads over ranks; feature grads map linearly to them.
    img_grad = np.concatenate([o["img_grad"] for o in per_rank]) / world
    txt_grad = np.concatenate([o["txt_grad"] for o in per_rank]) / world
    np.testing.assert_allclose(img_grad, img.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(txt_grad, txt.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert np.mean([o["scale_grad"] for o in per_rank]) == pytest.approx(float(scale.grad), rel=1e-5)
