"""Test-wide settings that must be in place before torch starts its thread pool."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One thread, as in every worker and subprocess the tests start: results computed in the test
# process are compared bit for bit with theirs, and a different thread count sums in another order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# What `train.precision: auto` means on a CPU depends on the CPU (native bf16 or not): the suite
# pins the answer to "no" so that no test depends on the machine it meets; the precision-sensitive
# tests run under both answers (the `cpu_bf16` fixture in tests/conftest.py).
os.environ.setdefault("ORBITCLIP_CPU_BF16", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
