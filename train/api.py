"""The declared surface of ``train`` for the other packages (eval, launch, search).

Packages outside ``train`` import from here only (``tests/test_layers.py`` enforces it),
so the inside of ``train`` can move without breaking them. Importing this module does not
import torch (``python -m launch status`` stays fast); the heavy names load on first call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.core.config import Config, load_config
from train.core.configbase import ConfigError, from_dict, read_yaml, to_dict
from train.core.distenv import DistEnv, dist_env_from
from train.core.errors import PeerError, PeerLostError, UserError
from train.core.rundir import CheckpointDir, RunDir

if TYPE_CHECKING:
    import torch


def on_peer_lost(hook: Any) -> None:
    """Call ``hook(report)`` before a rank whose heartbeat lost its peers exits (a launcher's
    chance to requeue the job; see :mod:`train.core.heartbeat`); None removes it."""
    from train.core.heartbeat import on_peer_lost as _on

    _on(hook)


def ensure_torchvision() -> bool:
    """Make torchvision importable next to a CPU torch (see :mod:`train.core.compat`)."""
    from train.core.compat import ensure_torchvision as _ensure

    return _ensure()


def make_comm(env: DistEnv, device: str | torch.device = "cpu") -> Any:
    """The collectives of ``env``'s job (:class:`train.core.collectives.Comm`): the one way
    to talk to other ranks (tensors placed on the communication device, failure agreement)."""
    from train.core.collectives import Comm

    return Comm(env, device)


def load_model(spec: str, device: str | torch.device = "cpu") -> Any:
    """A ``ClipBundle`` for evaluation or search (see :func:`train.model.load_model`)."""
    from train.model import load_model as _load

    return _load(spec, device)


def save_local_dir(bundle: Any, folder: str | Path) -> Path:
    """Export a bundle as an open_clip ``local-dir:`` folder."""
    from train.model import save_local_dir as _save

    return _save(bundle, folder)


__all__ = [
    "CheckpointDir", "Config", "ConfigError", "DistEnv", "PeerError", "PeerLostError", "RunDir", "UserError", "dist_env_from",
    "ensure_torchvision",
    "from_dict", "load_config", "load_model", "make_comm", "on_peer_lost", "read_yaml", "save_local_dir", "to_dict",
]
