"""Test-wide settings that must be in place before torch starts its thread pool."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One thread, as in every worker and subprocess the tests start: results computed in the test
# process are compared bit for bit with theirs, and a different thread count sums in another order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
