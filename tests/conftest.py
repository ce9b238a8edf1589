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
