"""Make ``import torchvision`` work next to a CPU-only torch.

The registry's torchvision wheel is a CUDA build. Beside the CPU torch its C++
extension cannot load, and ``torchvision/_meta_registrations.py`` then fails with
``RuntimeError: operator torchvision::nms does not exist`` because it registers
fake kernels for ops whose schemas the extension would have defined. That breaks
``import open_clip``, ``timm`` and transformers' CLIP.

:func:`ensure_torchvision` tries to load the real extension first; only if that
fails does it define the two missing schemas, so on GPU machines with a matching
torch it changes nothing. Kernels are not provided: ``torchvision.ops.nms`` still
does not run here (nothing in orbitclip uses it). Call it before anything imports
torchvision; importing :mod:`train.model.factory` or :mod:`eval` does.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fallback_lib: torch.library.Library | None = None


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: nothing to patch
    folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def ensure_torchvision() -> bool:
    """Define torchvision's op schemas if its extension cannot load.

    Returns:
        True if the fallback schemas were defined, False if nothing was needed.
    """
    global _fallback_lib
    if _fallback_lib is not None:
        return True
    if _extension_loads():
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not torch._C._dispatch_has_kernel(f"torchvision::{name}"):
            try:
                lib.define(schema)
            except RuntimeError:
                pass  # already defined by someone else: fine
    _fallback_lib = lib
    return True
