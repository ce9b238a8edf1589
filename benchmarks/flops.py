"""FLOPs of one training step (``torch.utils.flop_counter``) and the device's matmul peak."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

H100_BF16_DENSE = 989e12
"""NVIDIA's H100 SXM dense bf16 tensor-core peak (FLOP/s), the default MFU denominator."""


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's counter attributes to ``fn()`` (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                        iters: int = 50) -> float:
    """Achieved FLOP/s of a large square matmul on ``device`` (best of a short timed loop)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / iters)
    return 2 * n**3 / best


def mfu(flops_per_step: float, steps_per_s: float, peak: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s over ``peak``."""
    return flops_per_step * steps_per_s / peak
