"""orbitclip's shipped configs: run configs and recipes, model architectures (``models/``),
benchmark definitions (``benchmarks/``) and DeepSpeed presets (``deepspeed/``).

A package so that ``pip install .`` ships them and code finds them the same way in a
checkout and in site-packages: through :data:`ROOT`, never relative to the repository.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The source checkout these configs live in (run in place or ``pip install -e``), None
    when orbitclip is installed into site-packages."""
    parent = ROOT.parent
    return parent if (parent / "setup.cfg").is_file() and (parent / "train").is_dir() else None


def project_root() -> Path:
    """Base of project-relative defaults (``../shared/data``, ``.cache/``): the checkout when
    running from one, else the current directory (an installed orbitclip has no repository)."""
    return checkout_root() or Path.cwd()


def run_config(name_or_path: str | Path) -> Path:
    """A run config: an existing file, or a shipped one by name (``demo``, ``recipes/eurosat_scratch_cpu``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (ROOT / p, ROOT / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    return p  # the loader reports it as missing, with the name the user gave
