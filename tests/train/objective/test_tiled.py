"""The tiled losses equal the plain ones (:mod:`train.objective.loss`, the reference).

Tolerances, measured on this CPU: in float64 the value and every gradient agree to ~1e-15
relative (asserted: 1e-12) — the tiling is exact, only the summation order differs; in
float32 to ~5e-7 (asserted: 1e-5, as the equivalence tests' fp32 contract). The CLIP bias
gradient is exactly 0 in the tiled loss (the bias cancels in both softmaxes) and rounding
noise (< 1e-6) in the plain one. Distributed (gloo, 3 ranks) and feature-cache cases are in
``test_loss.py`` and ``tests/train/engines/test_equivalence.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.train.engines.equiv_workers import broken_lse
from train.core.config import ConfigError, load_config
from train.objective.loss import ClipLoss, SigLipLoss
from train.objective.tiled import TiledClipLoss, TiledSigLipLoss

PAIRS = {"clip": (ClipLoss, TiledClipLoss), "siglip": (SigLipLoss, TiledSigLipLoss)}
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def inputs(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return [img, txt, torch.tensor(14.0, dtype=torch.float32), torch.tensor(-3.0, dtype=torch.float32)]


def value_and_grads(loss: torch.nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    xs = [x.clone().requires_grad_() for x in xs]
    out = loss(*xs)
    out.backward()
    return [out.detach()] + [x.grad for x in xs]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float, kind: str) -> None:
    names = ["loss", "image", "text", "scale", "bias"]
    for name, a, b in zip(names, got, want):
        if kind == "clip" and name == "bias":
            assert float(a) == 0.0 and abs(float(b)) < 1e-6
            continue
        assert a.dtype == b.dtype, name
        scale = b.abs().max().double().clamp_min(1e-30)
        err = float((a.double() - b.double()).abs().max() / scale)
        # N = 1 CLIP: the loss is exactly 0 in the reference (one column): compare absolutely.
        assert err <= rtol or float((a.double() - b.double()).abs().max()) <= rtol, (name, err)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,block", [(1, 8), (5, 8), (37, 8), (64, 8), (2048, 512)])
def test_tiled_equals_plain(kind, dtype, n, block):
    plain, tiled = PAIRS[kind]
    xs = inputs(n, 16, dtype, seed=n)
    assert_close(value_and_grads(tiled(block), xs), value_and_grads(plain(), xs), RTOL[dtype], kind)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bf16_features_accumulate_in_fp32_and_get_bf16_gradients(kind):
    plain, tiled = PAIRS[kind]
    xs = inputs(40, 16, torch.bfloat16)
    got = value_and_grads(tiled(8), xs)
    # The reference on the same bf16 values, computed in float64.
    want = value_and_grads(plain(), [x.double() if x.dim() else x for x in xs])
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert got[0].dtype == torch.float32  # accumulated in fp32, not in bf16
    assert abs(float(got[0]) - float(want[0])) / abs(float(want[0])) < 1e-6
    for g, w in zip(got[1:3], want[1:3]):  # only the final rounding to bf16 (2^-8 relative)
        assert float((g.double() - w).abs().max() / w.abs().max()) < 1e-2


def test_a_block_left_out_of_the_log_sum_exp_is_caught():
    """Negative control: the comparisons above fail for a broken tiling."""
    xs = inputs(37, 16, torch.float64)
    want = value_and_grads(ClipLoss(), xs)
    with broken_lse():
        got = value_and_grads(TiledClipLoss(8), xs)
    with pytest.raises(AssertionError):
        assert_close(got, want, RTOL[torch.float64], "clip")


def test_every_block_size_gives_the_same_loss():
    xs = inputs(50, 16, torch.float64)
    values = [float(value_and_grads(TiledClipLoss(b), xs)[0]) for b in (1, 7, 50, 4096)]
    assert max(values) - min(values) < 1e-12


def test_block_size_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="loss.block_size must be >= 1"):
        load_config(None, ["train.steps=1", "data.source=synthetic", "loss.block_size=0"])
    with pytest.raises(ValueError, match="block_size"):
        TiledSigLipLoss(0)
