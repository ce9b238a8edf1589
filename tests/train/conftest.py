"""Fixtures shared by the tests of ``train``."""

from __future__ import annotations

import pytest
import torch

from tests import REPO_ROOT


@pytest.fixture(scope="module")
def micro_clip() -> torch.nn.Module:
    """A real open_clip CLIP (orbit-micro), so parameter names are the real ones."""
    from train.api import ensure_torchvision

    ensure_torchvision()
    import open_clip

    open_clip.add_model_config(str(REPO_ROOT / "configs" / "models" / "orbit-micro.json"))
    torch.manual_seed(0)
    return open_clip.create_model("orbit-micro")
