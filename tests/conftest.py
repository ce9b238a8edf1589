"""Shared fixtures: where the real data is, and fresh temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real remote-sensing subsets in ../shared/data, or a skip saying why."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (see DESIGN.md); skipping")
    return SHARED_DATA


@pytest.fixture(params=["native-bf16", "no-bf16"])
def cpu_bf16(request, monkeypatch) -> str:
    """Run a test under both answers to "does this CPU compute bf16 natively?".

    Sets ``ORBITCLIP_CPU_BF16`` (inherited by the processes the test starts) and returns what
    ``train.precision: auto`` then means on a CPU: ``"bf16"`` or ``"fp32"``. Tolerances for
    each: :data:`tests.precision.TOLERANCE`.
    """
    native = request.param == "native-bf16"
    monkeypatch.setenv("ORBITCLIP_CPU_BF16", "1" if native else "0")
    return "bf16" if native else "fp32"
