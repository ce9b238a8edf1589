"""Zero-shot, retrieval and probe benchmarks for CLIP models on remote sensing.

``python -m eval run --model SPEC --benchmark NAME --out DIR`` or, from Python,
:func:`eval.api.evaluate`. Benchmarks are YAML files in configs/benchmarks.
"""

from train.api import ensure_torchvision

# open_clip / torchvision may be imported below us (model loading); see DESIGN.md
ensure_torchvision()
