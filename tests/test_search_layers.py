"""search imports train only through train.api (and eval only through its documented helpers)."""

from __future__ import annotations

import ast
from pathlib import Path

SEARCH = Path(__file__).resolve().parents[1] / "search"
ALLOWED = {"train": {"train.api"}, "eval": {"eval.features", "eval.dataset", "eval.loaders"}, "launch": set()}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module in ALLOWED:  # `from train import model` imports train.model
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_search_uses_only_the_declared_surfaces_of_other_packages():
    files = sorted(SEARCH.glob("*.py"))
    assert len(files) > 10
    bad = []
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in ALLOWED and name not in ALLOWED[top] and name != top:
                bad.append(f"{path.name}: {name}")
            if name in ALLOWED:  # a bare `import train` reaches everything
                bad.append(f"{path.name}: {name}")
    assert not bad, f"search must import train via train.api only: {bad}"


def test_the_layer_check_catches_a_violation(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from train.model import load_model\nfrom train import config\nimport eval.runner\n")
    assert {"train.model", "train.config", "eval.runner"} <= imported_modules(probe)
