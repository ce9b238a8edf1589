"""Search a shard collection with a CLIP model: text -> image, image -> image, and a phrase
inside a large scene.

``python -m search index|query|locate|serve`` (see :mod:`search.cli`); from Python,
:mod:`search.api`. The package imports ``train`` only through :mod:`train.api`.
"""

from train.api import ensure_torchvision

# open_clip / torchvision are imported below us (model loading); see DESIGN.md
ensure_torchvision()
