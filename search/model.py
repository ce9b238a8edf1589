"""Load a model for search and say exactly which model it is.

An index records the model's identity: the spec it was built with plus a digest of the
model's state dict. A query embeds with the model again, and a different digest (another
model, or a run directory whose ``latest`` checkpoint has moved on) is refused: vectors of
two models live in unrelated spaces, so such a query would return confident nonsense.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from search.errors import SearchError
from train.api import ConfigError, load_model


@dataclass(frozen=True)
class ModelIdentity:
    """What an index needs to know about the model that embedded it."""

    spec: str
    """The spec as given (``orbit-tiny``, ``runs/x``, ``hf:DIR`` ...)."""
    spec_resolved: str
    """The spec with a path made absolute, so a query from another folder finds the model."""
    arch: str
    digest: str
    """sha256 of the state dict (names, dtypes, shapes and bytes), first 16 hex digits."""
    embed_dim: int
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelIdentity":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` is this process's GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SearchError(f"unknown --device {device!r} (auto, cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SearchError(f"--device {device}: no CUDA GPU on this machine")
    return dev


def resolve_spec(spec: str) -> str:
    """Absolute form of a path-like spec (``DIR``, ``hf:DIR``, ``ARCH:FILE``); names stay as they are."""
    for prefix in ("local-dir:", "hf:"):
        if spec.startswith(prefix):
            path = Path(spec[len(prefix):]).expanduser()
            return prefix + str(path.resolve()) if path.exists() else spec
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser().resolve())
    arch, sep, rest = spec.partition(":")
    if sep and Path(rest).expanduser().exists():
        return f"{arch}:{Path(rest).expanduser().resolve()}"
    return spec


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict in name order (stable across devices and processes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # bytes through uint8 so bf16 and friends (no numpy dtype) hash too
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load(spec: str, device: torch.device) -> tuple[Any, ModelIdentity]:
    """The eval harness's ``ClipBundle`` for ``spec`` and its identity.

    Raises:
        SearchError: the spec names no loadable model.
    """
    try:
        bundle = load_model(spec, device=device)
    except (ConfigError, ValueError, FileNotFoundError, OSError, RuntimeError, KeyError) as e:
        # train's loader names the problem (unknown arch, missing checkpoint ...): keep its words
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SearchError(f"cannot load model {spec!r}: {first}") from None
    dim = _embed_dim(bundle)
    identity = ModelIdentity(spec=spec, spec_resolved=resolve_spec(spec), arch=str(getattr(bundle, "arch", "?")),
                             digest=state_digest(bundle.model), embed_dim=dim, image_size=int(bundle.image_size))
    return bundle, identity


def _embed_dim(bundle: Any) -> int:
    cfg = getattr(bundle, "model_cfg", None) or {}
    if "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    proj = getattr(bundle.model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    raise SearchError("cannot tell the model's embedding size (no embed_dim in its config)")


def check_same_model(recorded: ModelIdentity, got: ModelIdentity, index_path: str) -> None:
    """Refuse to query an index with a model other than the one it was built with."""
    if recorded.digest != got.digest:
        raise SearchError(
            f"model mismatch: index {index_path} was built with {recorded.spec} ({recorded.arch}, digest "
            f"{recorded.digest}), but {got.spec} is {got.arch} with digest {got.digest}; query with the model "
            f"that built the index, or rebuild it with `python -m search index --model {got.spec} ...`")

