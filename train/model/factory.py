"""CLIP models through open_clip: :func:`build_model` for training, :func:`load_model` for eval.

Architectures are open_clip's (any name from ``open_clip.list_models()``) plus our tiny
CPU ones in ``configs/models/*.json``, registered on import. Weights come from an
open_clip pretrained tag, a checkpoint file, an open_clip ``local-dir:`` folder, a
transformers CLIP folder (``hf:DIR``, converted by :mod:`train.model.hf`) or one of our
run directories. Every weight file goes through :func:`load_weights`, which names missing,
unexpected and mis-shaped keys instead of failing deep inside torch.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

import train.core.compat

train.core.compat.ensure_torchvision()

import open_clip  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict  # noqa: E402

import configs  # noqa: E402
from train.core.config import ModelConfig, load_config  # noqa: E402
from train.core.errors import UserError  # noqa: E402
from train.core.rundir import RunDir  # noqa: E402

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = configs.ROOT / "models"
LOCAL_DIR_PREFIX = "local-dir:"
HF_PREFIX = "hf:"
LOCAL_DIR_CONFIG = "open_clip_config.json"
LOCAL_DIR_WEIGHTS = "open_clip_model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_registered: set[Path] = set()


class ModelLoadError(UserError, ValueError):
    """A model spec, config or checkpoint cannot give the requested model."""


def register_model_configs(folder: str | Path = MODEL_CONFIG_DIR) -> list[str]:
    """Register every ``*.json`` architecture in ``folder`` with open_clip (idempotent).

    Returns:
        The architecture names found (file stems).
    """
    folder = Path(folder).resolve()
    if folder not in _registered:
        open_clip.add_model_config(folder)
        _registered.add(folder)
    return sorted(p.stem for p in folder.glob("*.json"))


register_model_configs()


@dataclass
class ClipBundle:
    """An open_clip model plus everything needed to feed it."""

    model: torch.nn.Module
    """The plain open_clip module (``encode_image``, ``encode_text``, ``logit_scale``)."""
    tokenizer: Callable[[list[str]], torch.Tensor]
    """``list[str] -> LongTensor[N, context_length]``."""
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str
    """Architecture name (or the ``local-dir:``/``hf:`` spec it came from)."""
    eval_transform: Callable[[Any], torch.Tensor]
    """open_clip's validation preprocessing: resize, center crop, to tensor, normalize."""
    model_cfg: dict[str, Any] = field(default_factory=dict)
    """open_clip model config that rebuilds ``model`` (what :func:`save_local_dir` writes)."""


@dataclass
class _Source:
    """Where an architecture and its weights come from, before anything is built."""

    arch: str
    model_cfg: dict[str, Any]
    create_name: str | None
    """Name for ``open_clip.create_model``/``get_tokenizer``; None = plain ``CLIP(**model_cfg)``."""
    state_dict: dict[str, torch.Tensor] | None = None
    origin: str = ""
    tag: str | None = None
    """An open_clip pretrained tag: open_clip downloads and loads it itself."""
    preprocess: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    """Build options the source implies (a run's image_size / init_logit_bias)."""


# ----------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (``.safetensors``, or a torch file holding a state_dict or
    ``{"state_dict": ...}``), dropping DDP ``module.`` and ``torch.compile`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        sd = open_clip.factory.load_state_dict(str(path))
    except StopIteration:
        raise ModelLoadError(f"{path}: the state dict is empty") from None
    except Exception as e:  # torch/safetensors raise many types for corrupt or foreign files
        # torch's own message runs over many lines and, for data that is no checkpoint at all,
        # only advises weights_only=False; its first line is kept where it says more.
        first = (str(e).strip().splitlines() or [""])[0]
        why = type(e).__name__ if not first or "weights_only" in first else first[:160]
        raise ModelLoadError(f"{path}: not a readable PyTorch or safetensors checkpoint ({why})") from e
    if not isinstance(sd, Mapping):
        raise ModelLoadError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelLoadError(f"{path}: not a plain state dict; non-tensor entries: {', '.join(map(str, bad[:8]))}")
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def _key_report(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:10]) + (f" ... (+{len(keys) - 10})" if len(keys) > 10 else "")
    return f"\n  {label} ({len(keys)}): {shown}"


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str,
                 resize_pos_embed: bool = False) -> None:
    """Load ``state_dict`` strictly, raising :class:`ModelLoadError` that lists bad keys.

    A model ``logit_bias`` absent from the checkpoint keeps its initial value (SigLIP
    fine-tuning from CLIP weights). ``resize_pos_embed`` interpolates the ViT position
    table when the image size was deliberately overridden.
    """
    sd = dict(state_dict)
    target = model.state_dict()
    for key in ("logit_scale", "logit_bias"):  # 0-dim vs [1] differ between exporters
        if key in sd and key in target and sd[key].shape != target[key].shape \
                and sd[key].numel() == target[key].numel():
            sd[key] = sd[key].reshape(target[key].shape)
    if "logit_bias" in target and "logit_bias" not in sd:
        sd["logit_bias"] = target["logit_bias"].clone()
    if resize_pos_embed:
        open_clip.model.resize_pos_embed(sd, model)
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sorted(set(sd) & set(target)) if sd[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        msg = f"weights from {origin} do not fit the model:"
        msg += _key_report("missing", missing) if missing else ""
        msg += _key_report("unexpected", unexpected) if unexpected else ""
        msg += _key_report("shape mismatch", shapes) if shapes else ""
        if "logit_bias" in unexpected:
            msg += "\n  (the checkpoint has a logit_bias: set model.init_logit_bias to keep it)"
        raise ModelLoadError(msg)
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- sources


def _arch_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=6, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else "see open_clip.list_models()"
        raise ModelLoadError(f"unknown architecture {name!r}; {hint}")
    return cfg


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith(".") or Path(spec).suffix in _WEIGHT_SUFFIXES


def _from_arch(arch: str, weights: str | None) -> _Source:
    """``ARCH`` or ``ARCH:TAG_OR_FILE``."""
    cfg = _arch_config(arch)
    if not weights:
        return _Source(arch, cfg, arch, origin=arch)
    if os.path.isfile(weights):
        return _Source(arch, cfg, arch, state_dict=read_state_dict(weights), origin=weights)
    if open_clip.factory.get_pretrained_cfg(arch, weights):
        return _Source(arch, cfg, arch, tag=weights, origin=f"{arch}:{weights}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise FileNotFoundError(f"{weights!r} is neither an existing checkpoint file nor an open_clip pretrained "
                            f"tag of {arch} (tags: {', '.join(tags) if tags else 'none'})")


def _local_dir_arch(folder: Path) -> _Source:
    """The architecture part of a ``local-dir:`` folder (its open_clip_config.json)."""
    config_path = folder / LOCAL_DIR_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"local-dir:{folder}: {config_path} not found")
    data = json.loads(config_path.read_text())
    if "model_cfg" not in data:
        raise ModelLoadError(f"{config_path}: no 'model_cfg' entry")
    arch = data.get("orbitclip", {}).get("arch") or f"{LOCAL_DIR_PREFIX}{folder}"
    return _Source(arch, data["model_cfg"], f"{LOCAL_DIR_PREFIX}{folder}", origin=str(config_path))


def _from_local_dir(folder: Path) -> _Source:
    """open_clip's ``local-dir:`` layout: open_clip_config.json + weights file."""
    src = _local_dir_arch(folder)
    preferred = [folder / LOCAL_DIR_WEIGHTS, folder / "open_clip_pytorch_model.bin"]
    found = [p for p in preferred if p.is_file()] or sorted(
        p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not found:
        # open_clip would only warn and hand back a random model: refuse instead
        raise FileNotFoundError(f"local-dir:{folder}: no weights file ({LOCAL_DIR_WEIGHTS})")
    src.state_dict, src.origin = read_state_dict(found[0]), str(found[0])
    return src


def _from_hf(folder: Path) -> _Source:
    """A transformers CLIPModel folder, converted to open_clip."""
    from train.model.hf import load_hf_clip, read_hf_preprocess

    model_cfg, sd = load_hf_clip(folder)
    text = model_cfg["text_cfg"]
    eot = open_clip.SimpleTokenizer().eot_token_id
    # The bundle tokenizes with open_clip's CLIP BPE: only models on that vocabulary pool right.
    if text["vocab_size"] != eot + 1 or (text["pool_type"] == "eos" and text["eos_id"] != eot):
        raise ModelLoadError(f"hf:{folder}: vocab_size={text['vocab_size']} / eos id do not match the CLIP BPE "
                             f"tokenizer (49408 tokens, EOT {eot}); only CLIP-vocabulary models are supported")
    return _Source(f"{HF_PREFIX}{folder}", model_cfg, None, state_dict=sd, origin=f"{HF_PREFIX}{folder}",
                   preprocess=read_hf_preprocess(folder))


def _from_run(path: Path) -> _Source:
    """A run directory, one of its step folders, or a checkpoint file inside a run."""
    run = RunDir.containing(path)
    if path.is_file():
        ckpt = path
    elif (path / "model.pt").is_file() and not RunDir(path).is_run():  # a step folder
        ckpt = path / "model.pt"
    elif RunDir(path).is_run():
        run, ckpt = RunDir(path), RunDir(path).newest_model_file()
    else:
        run = None
    if run is None:
        raise ModelLoadError(f"{path}: no config.yaml here or in its parent folders, so the architecture is "
                             f"unknown; use ARCH:{path} (or local-dir:/hf: for exported folders)")
    src = _run_architecture(run)
    src.state_dict, src.origin = read_state_dict(ckpt), str(ckpt)
    return src


def _run_architecture(run: RunDir) -> _Source:
    """What a run trained (architecture, build overrides), without its weights."""
    mc = load_config(run.config).model
    pretrained = mc.pretrained or ""
    if run.model_config.is_file():  # written next to the final model.pt: a self-describing run
        src = _local_dir_arch(run.path)
    elif pretrained.startswith((LOCAL_DIR_PREFIX, HF_PREFIX)):
        try:  # the run fine-tuned that folder's architecture; its weights are replaced by the caller
            src = _resolve(pretrained)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"run {run.path} was built from model.pretrained={pretrained}, which defines "
                                 f"its architecture and cannot be read now: {e}") from e
    else:
        src = _Source(mc.name, _arch_config(mc.name), mc.name)
    src.overrides = {"image_size": mc.image_size, "init_logit_bias": mc.init_logit_bias}
    return src


def _resolve(spec: str) -> _Source:
    """Parse a model spec (see :func:`load_model`) into a :class:`_Source`."""
    if spec.startswith(LOCAL_DIR_PREFIX):
        return _from_local_dir(Path(spec[len(LOCAL_DIR_PREFIX):]))
    if spec.startswith(HF_PREFIX):
        return _from_hf(Path(spec[len(HF_PREFIX):]))
    path = Path(spec)
    if path.exists():
        return _from_run(path)
    arch, sep, weights = spec.partition(":")
    if not sep and _looks_like_path(spec) and open_clip.get_model_config(spec) is None:
        raise FileNotFoundError(f"{spec}: no such run directory or checkpoint file")
    return _from_arch(arch, weights or None)


# ----------------------------------------------------------------------------- building


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "no CLIP weights found" not in message


@contextlib.contextmanager
def _without_random_init_warning(active: bool) -> Iterator[None]:
    """open_clip warns "initialized randomly" (or, for a ``local-dir:`` whose weights it cannot
    read, such as a run's model.pt, "no CLIP weights found") although we load the weights right after."""
    filt = _DropRandomInitWarning()
    root = logging.getLogger()
    if active:
        root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _instantiate(src: _Source, overrides: Mapping[str, Any], allow_checkpoint_bias: bool) -> ClipBundle:
    """Create the open_clip model for ``src`` with ``overrides`` and load its weights."""
    cfg = copy.deepcopy(src.model_cfg)
    opts = {k: v for k, v in {**src.overrides, **overrides}.items() if v is not None}
    logit = {k: opts[k] for k in ("init_logit_scale", "init_logit_bias") if k in opts}
    sd = src.state_dict
    if allow_checkpoint_bias and sd is not None and "logit_bias" in sd and "init_logit_bias" not in logit \
            and cfg.get("init_logit_bias") is None:
        logit["init_logit_bias"] = 0.0  # placeholder: the checkpoint's value is loaded below
    if "image_size" in opts:
        cfg["vision_cfg"]["image_size"] = opts["image_size"]
    if "patch_dropout" in opts:
        cfg["vision_cfg"]["patch_dropout"] = opts["patch_dropout"]
    cfg.update(logit)
    if src.create_name is not None:
        with _without_random_init_warning(active=sd is not None):
            model = open_clip.create_model(
                src.create_name, pretrained=src.tag, load_weights=src.tag is not None,
                force_image_size=opts.get("image_size"), force_patch_dropout=opts.get("patch_dropout"),
                force_preprocess_cfg=src.preprocess or None, pretrained_text=sd is None, **logit)
    else:
        model = open_clip.CLIP(**cfg)
        pp = merge_preprocess_dict(asdict(PreprocessCfg()), src.preprocess)
        pp["size"] = model.visual.image_size
        open_clip.set_model_preprocess_cfg(model, pp)
    if sd is not None:
        load_weights(model, sd, src.origin, resize_pos_embed="image_size" in opts)
    if src.tag and "init_logit_bias" in logit and model.logit_bias is not None \
            and bool((model.logit_bias == 0).all()):
        # open_clip zero-fills a bias the tag's checkpoint lacks; SigLIP needs the configured init
        with torch.no_grad():
            model.logit_bias.fill_(logit["init_logit_bias"])
    return _bundle(model, src, cfg)


def pixel_stats(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a CLIP model's image tower expects its input normalized with (open_clip's
    preprocessing config, which :func:`save_model_config` writes too), or None for a module that
    is no open_clip CLIP (tests' toy modules)."""
    try:
        pp = open_clip.get_model_preprocess_cfg(model)
        return tuple(pp["mean"]), tuple(pp["std"])
    except (AttributeError, KeyError):
        return None


def _bundle(model: torch.nn.Module, src: _Source, cfg: dict[str, Any]) -> ClipBundle:
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelLoadError(f"{src.arch}: non-square input size {tuple(size)} is not supported")
        size = size[0]
    if src.create_name is not None:
        tokenizer = open_clip.get_tokenizer(src.create_name)
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    pp_cfg = PreprocessCfg(**{k: v for k, v in pp.items() if k in PreprocessCfg.__dataclass_fields__})
    mean, std = pixel_stats(model)
    return ClipBundle(
        model=model, tokenizer=tokenizer, image_size=int(size), mean=mean, std=std,
        arch=src.arch, eval_transform=image_transform_v2(pp_cfg, is_train=False), model_cfg=cfg,
    )


def _training_source(cfg: ModelConfig) -> _Source:
    """Architecture + weights for training: ``cfg.name`` unless the weights define their own."""
    pretrained = cfg.pretrained
    if not pretrained:
        return _from_arch(cfg.name, None)
    if pretrained.startswith((LOCAL_DIR_PREFIX, HF_PREFIX)):
        src = _resolve(pretrained)
        log.info("model.pretrained=%s defines the architecture; model.name=%s is not used", pretrained, cfg.name)
        return src
    if Path(pretrained).is_dir():
        src = _from_run(Path(pretrained))
        if src.create_name == src.arch != cfg.name:  # a registered name that differs; folders define their own
            raise ModelLoadError(f"model.name={cfg.name!r} but run {pretrained} trained {src.arch!r}")
        # the image size is architecture; the logit bias etc. are the new run's own choice
        src.overrides = {"image_size": src.overrides.get("image_size")}
        return src
    return _from_arch(cfg.name, pretrained)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> ClipBundle:
    """Build the training model: weights, LiT locks, patch dropout, grad checkpointing.

    Args:
        cfg: the ``model`` section of the run config.
        device: where the model goes.

    Returns:
        A :class:`ClipBundle` whose model is in train mode.
    """
    if not 0.0 <= cfg.patch_dropout < 1.0:
        raise ModelLoadError(f"model.patch_dropout must be in [0, 1), got {cfg.patch_dropout}")
    if cfg.lock_image_unlocked_groups < 0 or cfg.lock_text_unlocked_layers < 0:
        raise ModelLoadError("model.lock_*_unlocked_* must be >= 0")
    src = _training_source(cfg)
    bundle = _instantiate(src, {
        "image_size": cfg.image_size, "patch_dropout": cfg.patch_dropout,
        "init_logit_scale": cfg.init_logit_scale, "init_logit_bias": cfg.init_logit_bias,
    }, allow_checkpoint_bias=False)
    model = bundle.model
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                               freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True)
    if cfg.freeze_token_embedding:
        token_embedding(model).weight.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    bundle.model = model.to(device).train()
    return bundle


def token_embedding(model: torch.nn.Module) -> torch.nn.Embedding:
    """The text tower's token embedding (built-in CLIP or a CustomTextCLIP's ``text``)."""
    for owner in (model, getattr(model, "text", None)):
        emb = getattr(owner, "token_embedding", None)
        if isinstance(emb, torch.nn.Embedding):
            return emb
    raise ModelLoadError(
        "model.freeze_token_embedding: this architecture's text tower has no token_embedding "
        "(HF text towers are not supported)"
    )


def load_model(spec: str, device: str | torch.device = "cpu") -> ClipBundle:
    """Load a model for evaluation (eval mode, weights as saved).

    Args:
        spec: ``ARCH`` (random init), ``ARCH:TAG_OR_FILE``, ``local-dir:DIR``, ``hf:DIR``, a run
            directory of ours (its ``checkpoints/latest``), a step folder, or a checkpoint file
            inside a run directory (architecture from the run's ``config.yaml``).
        device: where the model goes.

    A random-init ``ARCH`` is drawn from seed 0 (the global RNG is left as it was), so a
    table's "random init" baseline row is the same model every time.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bundle = _instantiate(_resolve(spec), {}, allow_checkpoint_bias=True)
    bundle.model = bundle.model.to(device).eval()
    return bundle


def load_run_weights(run_dir: str | Path, state_dict: Mapping[str, torch.Tensor], origin: str,
                     device: str | torch.device = "cpu") -> ClipBundle:
    """A run's architecture with weights from elsewhere, in eval mode.

    For weights that are no ``model.pt`` file: a ZeRO checkpoint consolidated offline by
    :mod:`train.engines.deepspeed.export`.

    Args:
        run_dir: the run directory (its ``config.yaml`` / ``open_clip_config.json`` define the model).
        state_dict: plain open_clip state dict.
        origin: where the weights came from (named in error messages).
        device: where the model goes.
    """
    run = RunDir(Path(run_dir))
    if not run.is_run():
        raise ModelLoadError(f"{run.path}: not a run directory (no config.yaml)")
    src = _run_architecture(run)
    src.state_dict, src.origin = dict(state_dict), origin
    bundle = _instantiate(src, {}, allow_checkpoint_bias=True)
    bundle.model = bundle.model.to(device).eval()
    return bundle


def save_model_config(bundle: ClipBundle, folder: str | Path, step: int | None = None) -> Path:
    """Write ``open_clip_config.json`` (architecture + preprocessing) into ``folder``.

    In a run directory it makes the run self-describing: :func:`load_model` then needs
    neither the architecture registry nor the run's ``model.pretrained`` source. (open_clip's
    own ``local-dir:`` loader does not read ``model.pt``: ``python -m train export`` writes
    the folder it loads.) Patch dropout is a training option, not architecture: it is not written.

    Args:
        bundle: the model and its preprocessing.
        folder: where the file goes (created).
        step: the training step of the weights beside it, recorded for export provenance.
    """
    from open_clip.push_to_hf_hub import save_config_for_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(bundle.model_cfg)
    cfg.get("vision_cfg", {}).pop("patch_dropout", None)
    config_path = folder / LOCAL_DIR_CONFIG
    save_config_for_hf(bundle.model, config_path, model_config=cfg)
    data = json.loads(config_path.read_text())
    ours: dict[str, Any] = {"arch": bundle.arch}  # a readable name for reports; open_clip ignores it
    if step is not None:
        ours["step"] = int(step)
    data["orbitclip"] = ours
    config_path.write_text(json.dumps(data, indent=2))
    return config_path


def saved_step(folder: str | Path) -> int | None:
    """The step :func:`save_model_config` recorded in ``folder``, None if none was."""
    path = Path(folder) / LOCAL_DIR_CONFIG
    if not path.is_file():
        return None
    step = json.loads(path.read_text()).get("orbitclip", {}).get("step")
    return int(step) if step is not None else None


def save_local_dir(bundle: ClipBundle, folder: str | Path) -> Path:
    """Export as an open_clip ``local-dir:`` folder (open_clip_config.json + safetensors)."""
    import safetensors.torch

    folder = Path(folder)
    save_model_config(bundle, folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(folder / LOCAL_DIR_WEIGHTS))
    return folder


__all__ = [
    "ClipBundle", "ModelLoadError", "build_model", "load_model", "load_run_weights", "save_local_dir",
    "save_model_config", "saved_step", "load_weights", "read_state_dict", "register_model_configs",
    "MODEL_CONFIG_DIR", "LOCAL_DIR_CONFIG", "LOCAL_DIR_WEIGHTS",
]
