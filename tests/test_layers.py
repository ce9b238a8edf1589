"""The architecture, enforced: the layer rule inside ``train``, the declared surface for the other
packages, no import cycle anywhere, and one owner for collectives.

Imports are read from the source (every ``import`` statement, at any depth, so a lazy
import inside a function counts too); nothing is imported. DESIGN.md ("Map") shows the same
layers as a table.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import REPO_ROOT

PACKAGES = ("train", "eval", "launch", "shards", "search", "configs", "benchmarks")

# Inside train, lowest first: a module may import its own layer and lower layers only. The
# packages of the components layer (data, objective, optim) may not import each other.
TRAIN_LAYERS: list[tuple[str, ...]] = [
    ("train.core",),
    ("train.model",),
    ("train.data", "train.objective", "train.optim"),
    ("train.engines",),
    ("train.loop",),
    ("train.api", "train.config"),
    ("train.trainer", "train.export"),
    ("train.cli", "train.__main__", "train"),
]
ISOLATED = {2}
"""Layers whose packages must not import each other."""
SURFACE = "train.api"
"""What eval, launch and search may import from train."""
SEARCH_MAY_IMPORT_EVAL = {"eval", "eval.features", "eval.dataset", "eval.loaders"}
"""eval's helpers that search builds on (model features, image decoding, shard reading)."""
TRAIN_MAY_IMPORT = {"train.trainer": {"eval.api"}}
"""The only edges from train to the other project packages (evaluation during training)."""
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "barrier", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "gather", "scatter", "send", "recv", "isend", "irecv", "monitored_barrier"}
COLLECTIVE_OWNER = "train.core.collectives"


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            out[module_name(path, root)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (the longest known prefix), or None if external."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    edges = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule pkg.sub when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            dst = _resolve(name, modules)
            if dst is not None and dst != mod:
                edges.append(Edge(mod, dst, node.lineno))
    return edges


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def import_graph(modules: dict[str, Path]) -> list[Edge]:
    return [e for mod, path in modules.items() for e in imports_of(mod, path, modules)]


def train_layer(mod: str) -> tuple[int, str] | None:
    """(layer index, layer package) of a ``train`` module."""
    for i, layer in enumerate(TRAIN_LAYERS):
        for pkg in layer:
            if mod == pkg or (pkg != "train" and mod.startswith(pkg + ".")):
                return i, pkg
    return None


def layer_violations(edges: list[Edge]) -> list[str]:
    bad = []
    for e in edges:
        src_top, dst_top = e.src.split(".")[0], e.dst.split(".")[0]
        where = f"{e.src}:{e.line} imports {e.dst}"
        if src_top == "train" and dst_top == "train":
            src, dst = train_layer(e.src), train_layer(e.dst)
            if src is None or dst is None:
                bad.append(f"{where}: module outside the declared layers")
            elif dst[0] > src[0] or (dst[0] == src[0] and dst[0] in ISOLATED and dst[1] != src[1]):
                bad.append(f"{where}: a lower or sibling layer imports a higher one")
        elif src_top == "train" and dst_top not in ("train", "configs", "shards"):
            allowed = next((v for k, v in TRAIN_MAY_IMPORT.items() if e.src == k), set())
            if e.dst not in allowed:
                bad.append(f"{where}: train imports another project package")
        elif src_top in ("eval", "launch", "search") and dst_top == "train" and e.dst != SURFACE:
            bad.append(f"{where}: outside train, import only {SURFACE}")
        elif src_top == "search" and dst_top == "eval" and e.dst not in SEARCH_MAY_IMPORT_EVAL:
            bad.append(f"{where}: search uses eval only through {sorted(SEARCH_MAY_IMPORT_EVAL)}")
        elif src_top in ("eval", "launch", "shards", "configs") and dst_top == "search":
            bad.append(f"{where}: nothing below search imports it")
        elif src_top == "shards" and dst_top in ("train", "eval", "launch", "search"):
            bad.append(f"{where}: shards stands alone")
        elif src_top == "configs" and dst_top != "configs":
            bad.append(f"{where}: configs is data")
    return bad


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def collective_calls(modules: dict[str, Path]) -> list[str]:
    """``dist.<collective>(...)`` / ``torch.distributed.<collective>(...)`` outside the owner."""
    bad = []
    for mod, path in modules.items():
        if mod == COLLECTIVE_OWNER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in ("dist", "torch.distributed"):
                    bad.append(f"{mod}:{node.lineno} calls {owner}.{node.func.attr}")
    return bad


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge]]:
    modules = project_modules()
    return modules, import_graph(modules)


def test_every_train_module_has_a_layer(graph):
    modules, _ = graph
    assert [m for m in modules if m.startswith("train.") and train_layer(m) is None] == []


def test_layer_rule(graph):
    _, edges = graph
    assert layer_violations(edges) == []


def test_no_import_cycle_anywhere(graph):
    _, edges = graph
    assert cycles(edges) == []


def test_collectives_have_one_owner(graph):
    modules, _ = graph
    assert collective_calls(modules) == []


def test_the_rules_catch_what_they_forbid(tmp_path):
    """Each rule fails on a tree that breaks it (so a green run means something)."""
    for pkg, files in {
        "train/core": {"__init__.py": "", "a.py": "from train.engines.b import X\n"},
        "train/engines": {"__init__.py": "", "b.py": "import torch.distributed as dist\ndist.all_reduce(x)\n"},
        "train/data": {"__init__.py": "", "c.py": "def f():\n    from train.objective import d\n"},
        "train/objective": {"__init__.py": "", "d.py": "from train.data.c import f\n"},
        "eval": {"__init__.py": "", "e.py": "from train.core.a import X\n"},
        "train": {"__init__.py": "", "api.py": ""},
    }.items():
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    modules = project_modules(tmp_path)
    edges = import_graph(modules)
    violations = "\n".join(layer_violations(edges))
    assert "train.core.a:1 imports train.engines.b" in violations  # lower imports higher
    assert "train.data.c:2 imports train.objective.d" in violations  # sibling layer, lazily
    assert "eval.e:1 imports train.core.a" in violations  # outside the surface
    assert ["train.data.c", "train.objective.d"] in cycles(edges)
    assert collective_calls(modules) == ["train.engines.b:2 calls dist.all_reduce"]
