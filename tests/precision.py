"""What each precision guarantees, as the tests check it (README "Exact large batches" and
"Resume" state the same numbers).

``fp32``: ways of cutting one global batch (world size x accumulation) agree to float
rounding; resume is bit-identical. ``bf16`` autocast: the towers compute in bfloat16, so
2 x 4 samples and 1 x 8 samples round differently inside the matmuls; the loss itself is
computed in fp32 (``train.objective.forward.loss_fp32``). Measured on an Intel Xeon with
AVX-512 BF16 + AMX (2026-12-02), orbit-micro, world 2 x accum 2 vs the full batch, 4 AdamW
steps: parameters rel. 3.9e-4 (CLIP) / 2.4e-4 (SigLIP), per-step loss up to 3.8e-3 / 1.7e-3;
the trainer's logged loss, 2 ranks x 4 vs 1 x 8 samples: 6e-4. The tolerances are about 5x
to 10x those. Ranks agree bit for bit in bf16 as in fp32, and resume on the same machine and
process count stays bit-identical in bf16 too (same kernels in the same order).
"""

TOLERANCE = {
    "fp32": {"loss": 1e-5, "params": 1e-5},
    "bf16": {"loss": 2e-2, "params": 5e-3},
}
"""Relative tolerances: logged loss (per step) and the whole parameter vector after a few steps."""
