"""orbitclip's tests; the tree mirrors the packages (``tests/train/core`` tests ``train/core``)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
