"""Our config -> a DeepSpeed JSON, and checking a user-given one against our config.

Ownership: *our* config decides the batch, accumulation, clipping, precision and ZeRO
stage; the DeepSpeed JSON only adds ZeRO tuning knobs (bucket sizes, overlap, ...).
Without ``deepspeed.config`` the reviewed preset ``configs/deepspeed/zero{stage}.json``
provides those knobs. A user JSON that states one of our fields with a different value
is an error naming both values ("auto", as in Hugging Face configs, means "ours").

Accumulation: the micro-batch feature cache (:mod:`train.objective.forward`) must see the whole
local batch in one loss, so DeepSpeed's own ``gradient_accumulation_steps`` is always 1
with ``train_micro_batch_size_per_gpu = data.batch_size``; the cache's micro-batches run
inside one DeepSpeed step (see :mod:`train.engines.deepspeed.engine`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import configs
from train.core.config import DeepSpeedConfig
from train.core.configbase import ConfigError

PRESET_DIR = configs.ROOT / "deepspeed"
# Sections we never accept from a user JSON: we pass our own optimizer and scheduler,
# and fp16 needs loss scaling our engine does not drive.
_FORBIDDEN = {
    "optimizer": "we pass our own optimizer (optim.*); remove the 'optimizer' section",
    "scheduler": "we pass our own LR schedule (optim.schedule); remove the 'scheduler' section",
}


def strip_comments(obj: Any) -> Any:
    """Drop ``_comment``-style keys (any key starting with ``_``) at every level.

    DeepSpeed's pydantic sections reject unknown keys, so the presets' explanations must
    not reach it.
    """
    if isinstance(obj, dict):
        return {k: strip_comments(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [strip_comments(v) for v in obj]
    return obj


def read_json(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON file as a dict (comments stripped), with a clear error if unreadable."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config: {p} must hold a JSON object, got {type(data).__name__}")
    return strip_comments(data)


def preset_path(stage: int) -> Path:
    """The reviewed preset for a ZeRO stage (``configs/deepspeed/zero{stage}.json``)."""
    return PRESET_DIR / f"zero{stage}.json"


def _ours(ds: DeepSpeedConfig, batch_size: int, clip_grad_norm: float | None, bf16: bool,
          world_size: int) -> dict[tuple[str, ...], Any]:
    """The fields our config owns, as dotted paths into the DeepSpeed JSON."""
    return {
        ("train_micro_batch_size_per_gpu",): batch_size,
        ("gradient_accumulation_steps",): 1,
        ("train_batch_size",): batch_size * world_size,
        # DeepSpeed's default is 1.0, not "off": always write ours explicitly.
        ("gradient_clipping",): float(clip_grad_norm or 0.0),
        ("bf16", "enabled"): bf16,
        ("fp16", "enabled"): False,
        ("zero_optimization", "stage"): ds.zero_stage,
    }


_WHERE = {
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "1 (train.accum_steps drives our feature cache inside one DeepSpeed step)",
    ("train_batch_size",): "data.batch_size x world size",
    ("gradient_clipping",): "optim.clip_grad_norm (null = 0.0)",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "fp16 is not supported (use train.precision=bf16)",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
}


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def check_user_config(user: dict[str, Any], ours: dict[tuple[str, ...], Any], source: str) -> None:
    """Raise :class:`ConfigError` for every field where ``user`` disagrees with our config.

    Args:
        user: the user's DeepSpeed JSON (comments stripped).
        ours: from :func:`_ours`.
        source: the file name, for the message.
    """
    problems = [f"'{k}': {msg}" for k, msg in _FORBIDDEN.items() if k in user]
    for path, value in ours.items():
        theirs = _get(user, path)
        if theirs is None or theirs == "auto":
            continue
        if not _same(theirs, value):
            problems.append(f"'{'.'.join(path)}' is {theirs!r} in {source} but {value!r} from our config ({_WHERE[path]})")
    if problems:
        raise ConfigError("deepspeed.config conflicts with the training config:\n  " + "\n  ".join(problems))


def build_ds_config(ds: DeepSpeedConfig, batch_size: int, clip_grad_norm: float | None, bf16: bool,
                    world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run.

    Starts from ``deepspeed.config`` (validated) or the stage preset, then writes the
    fields our config owns (``data.batch_size``, ``optim.clip_grad_norm``, the resolved
    ``train.precision``, ``deepspeed.zero_stage``).

    Raises:
        ConfigError: unknown stage, unreadable JSON, or a conflict with our config.
    """
    stage = ds.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0..3, got {stage}")
    ours = _ours(ds, batch_size, clip_grad_norm, bf16, world_size)
    if ds.config:
        base = read_json(ds.config)
        check_user_config(base, ours, str(ds.config))
    elif preset_path(stage).is_file():
        base = read_json(preset_path(stage))
    else:
        base = {}
    out = copy.deepcopy(base)
    for path, value in ours.items():
        _set(out, path, value)
    zero = out.get("zero_optimization", {})
    if stage == 1 and not zero.get("overlap_comm", False) and zero.get("contiguous_gradients", True) is False:
        # Measured on deepspeed 0.19.7: this non-hook stage-1 path gives wrong CLIP gradients.
        raise ConfigError(
            "ZeRO-1 with overlap_comm=false and contiguous_gradients=false gave wrong gradients on deepspeed 0.19.7; "
            "set zero_optimization.contiguous_gradients=true (see configs/deepspeed/README.md)"
        )
    # Our optimizer may be torch's Adafactor, which DeepSpeed's ZeRO wrapper has not
    # whitelisted; it only needs param_groups/step/state_dict, which every torch optimizer has.
    out.setdefault("zero_allow_untested_optimizer", True)
    # Progress logging is ours (TensorBoard, progress bar); DeepSpeed's would spam stdout.
    out.setdefault("steps_per_print", 2**31 - 1)
    out.setdefault("wall_clock_breakdown", False)
    return out


def write_ds_config(ds_config: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``run_dir/deepspeed.json`` (what DeepSpeed actually got)."""
    path = Path(run_dir) / "deepspeed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    return path
