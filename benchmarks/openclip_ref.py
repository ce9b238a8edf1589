"""A side environment for open_clip's own trainer, the reference we measure against.

The open_clip wheel ships ``open_clip_train``, but its data loader needs
webdataset<=0.2.86 (it fails on 1.x with ``KeyError: 'fname'``) and pandas. We
install those two into a ``--target`` folder and put it first on PYTHONPATH of
the reference process only; our own code keeps webdataset 1.x.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = ROOT / ".cache" / "openclip_ref"
REF_PACKAGES = ["webdataset==0.2.86", "pandas"]


def ensure_env(target: Path = REF_DIR) -> Path:
    """Install open_clip_train's extra needs into ``target`` once; return it."""
    marker = target / ".installed"
    # An install made before the marker existed counts too (re-running pip needs the network).
    present = all(any(target.glob(f"{pkg.split('==')[0]}-{pkg.split('==')[1] if '==' in pkg else ''}*.dist-info"))
                  for pkg in REF_PACKAGES)
    if present and not marker.exists():
        marker.write_text("\n".join(REF_PACKAGES))
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        *REF_PACKAGES], check=True)
        marker.write_text("\n".join(REF_PACKAGES))
    return target


def ref_env(target: Path = REF_DIR) -> dict[str, str]:
    """Environment for a subprocess that imports the reference stack."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ensure_env(target)), str(ROOT), env.get("PYTHONPATH", "")])
    return env
