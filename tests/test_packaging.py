"""`pip install .` ships what the commands need: the wheel holds the configs and console scripts,
and an installed orbitclip trains the demo, lists benchmarks and answers --help from any directory."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests import REPO_ROOT

SHIPPED = ["configs/demo.yaml", "configs/models/orbit-tiny.json", "configs/benchmarks/eurosat.yaml",
           "configs/deepspeed/zero2.json", "configs/recipes/eurosat_scratch_cpu.yaml", "configs/deepspeed/README.md"]
SCRIPTS = {"orbitclip-train": "train.cli:main", "orbitclip-export": "train.export:main",
           "orbitclip-eval": "eval.cli:main", "orbitclip-shards": "shards.cli:main",
           "orbitclip-launch": "launch.cli:main", "orbitclip-search": "search.cli:main"}
_SOURCES = ["setup.cfg", "pyproject.toml", "README.md", "train", "eval", "shards", "launch", "configs", "search"]


def _env(**extra: str) -> dict[str, str]:
    """A child environment that cannot see the checkout (no PYTHONPATH) and stays offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the sources (building in place would leave build/ in the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in _SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.is_file():
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(root / "dist"), str(src)], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = (root / "dist").glob("orbitclip-*.whl")
    return whl


def test_wheel_ships_configs_and_console_scripts(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = configparser.ConfigParser()
        scripts.read_string(z.read(entry_points).decode())
    missing = [f for f in SHIPPED if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    for package in ("configs/__init__.py", "train/export.py", "eval/cli.py", "shards/cli.py", "launch/cli.py"):
        assert package in names
    # every shipped model architecture and benchmark definition travels
    for folder in ("models", "benchmarks"):
        local = {f"configs/{folder}/{p.name}" for p in (REPO_ROOT / "configs" / folder).iterdir()
                 if p.suffix in (".json", ".yaml")}
        assert local and local <= names, local - names
    assert not any(n.startswith("tests/") or "__pycache__" in n for n in names)
    assert dict(scripts["console_scripts"]) == SCRIPTS


def test_missing_demo_shards_say_how_to_build_them(tmp_path, monkeypatch, capsys):
    from train.cli import main

    monkeypatch.chdir(tmp_path)  # outside the repository, no runs/demo-shards here
    assert main(["--config", "demo", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: training shards runs/demo-shards not found (relative to the current directory "
                       f"{tmp_path}); build them first: python -m shards build --source synthetic "
                       f"--output runs/demo-shards --count 2000")


def test_project_root_is_the_checkout_here():
    import configs

    assert configs.checkout_root() == REPO_ROOT
    from eval.benchmark import BENCHMARK_DIR, available

    assert BENCHMARK_DIR == configs.ROOT / "benchmarks" and "eurosat" in available()


@pytest.mark.slow
def test_installed_wheel_runs_from_any_directory(wheel: Path, tmp_path: Path):
    """Install the wheel (no deps) into a fresh venv that sees this venv's dependencies through a
    .pth path entry (not the editable orbitclip: nested .pth files are not processed), then run the
    commands from a folder outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip())
    (purelib / "_orbitclip_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(py), "-c", "import train, configs; print(train.__file__); print(configs.ROOT); "
                  "print(configs.checkout_root())"], cwd=work)
    train_file, configs_root, checkout = where.stdout.split()
    assert train_file.startswith(str(purelib)) and configs_root.startswith(str(purelib)), where.stdout
    assert checkout == "None"

    build = _run([str(py), "-m", "shards", "build", "--source", "synthetic", "--output", "runs/demo-shards",
                  "--count", "64", "--quiet"], cwd=work)
    assert build.returncode == 0, build.stderr[-3000:]
    train = _run([str(py), "-m", "train", "--config", "demo", "train.steps=2", "data.batch_size=16",
                  "data.workers=0", "train.progress=false", "eval.at_end=false"], cwd=work, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert '"status": "finished", "step": 2' in train.stdout
    assert (work / "runs" / "demo" / "model.pt").is_file() and (work / "runs" / "demo" / "open_clip_config.json").is_file()

    listed = _run([str(py), "-m", "eval", "list"], cwd=work)
    assert listed.returncode == 0 and "eurosat" in listed.stdout and "ucm_captions_val" in listed.stdout, listed.stderr
    # installed: ORBITCLIP_DATA defaults to ../shared/data beside the current directory
    assert f"{(work.parent / 'shared' / 'data').resolve()}/eurosat_rgb (absent)" in listed.stdout, listed.stdout
    for script in SCRIPTS:
        helped = _run([str(venv / "bin" / script), "--help"], cwd=work)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (script, helped.stderr[-2000:])
