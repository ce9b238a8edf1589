"""Randomness: stable seeds, and the one place that captures and restores generator state.

Python's ``hash`` is salted per process, so DataLoader workers and resumed runs would
disagree; :func:`stable_seed` is a keyed digest of the values' ``repr`` instead, the same
everywhere. Two captures exist because two callers need different scopes:

* :func:`capture_process` / :func:`restore_process`: every generator of the process
  (python, numpy, torch CPU, every CUDA device), stored per rank in checkpoints;
* :func:`capture_device` / :func:`restore_device`: only what dropout / patch dropout
  draw from on one device, recorded per micro-batch by the feature cache (cheap).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints, strings, ...).

    Args:
        *parts: Values whose ``repr`` identifies the random stream, e.g.
            ``("sample", seed, epoch, key)``.

    Returns:
        A non-negative int usable by ``random.Random``, numpy and ``torch.manual_seed``.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) identically on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_process() -> dict[str, Any]:
    """Every generator of this process (python, numpy, torch CPU and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_process(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_process` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class DeviceRng:
    """Generator states that dropout / patch dropout draw from on one device."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None


def _has_cuda_generators(device: torch.device) -> bool:
    # A CPU build of torch has no CUDA generators even where a fake CUDA device answers
    # `is_available()` (the CUDA rehearsal, tests/train/rehearsal): nothing to record there.
    return device.type == "cuda" and torch.cuda._is_compiled()


def capture_device(device: torch.device) -> DeviceRng:
    """Record the CPU generator and, on CUDA, the device's generator."""
    cuda = torch.cuda.get_rng_state(device) if _has_cuda_generators(device) else None
    return DeviceRng(torch.get_rng_state(), cuda)


def restore_device(state: DeviceRng, device: torch.device) -> None:
    """Put the generators back to a recorded :class:`DeviceRng`."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, device)
