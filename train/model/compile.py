"""``train.compile``: ``torch.compile`` the two towers in place.

``nn.Module.compile`` keeps the module tree, so parameters, optimizer groups and checkpoint
keys are those of the eager model. Inductor normally draws random numbers with its own
generator; ``fallback_random`` makes dropout / patch dropout draw from torch's generators
as eager code does, which the feature cache's RNG replay (and exact resume) rely on.
"""

from __future__ import annotations

from torch import nn


def towers(model: nn.Module) -> list[nn.Module]:
    """The image tower and the text transformer of an open_clip CLIP (or CustomTextCLIP)."""
    found = [getattr(model, "visual", None), getattr(model, "text", None) or getattr(model, "transformer", None)]
    return [m for m in found if isinstance(m, nn.Module)]


def compile_towers(model: nn.Module) -> list[nn.Module]:
    """Compile the towers of ``model`` in place; returns them."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    compiled = towers(model)
    for tower in compiled:
        tower.compile()
    return compiled
