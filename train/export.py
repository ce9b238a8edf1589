"""``python -m train export SOURCE --format hf|open_clip|pt --out DIR``: take a model out of orbitclip.

``SOURCE`` is a run directory (its final ``model.pt``, else its latest checkpoint), a step
folder (DDP or DeepSpeed; a ZeRO folder without ``model.pt`` is consolidated offline), a
checkpoint file inside a run, or any model spec :func:`train.model.load_model` accepts
(``ARCH``, ``ARCH:FILE``, ``local-dir:DIR``, ``hf:DIR``). Formats:

* ``hf``: a transformers ``save_pretrained`` folder (``CLIPModel`` config + safetensors,
  ``CLIPProcessor`` = tokenizer + image processor with the model's size, mean and std).
  Models a ``CLIPModel`` cannot represent (a SigLIP ``logit_bias``, timm or HF towers, ...)
  are refused with the reason.
* ``open_clip``: ``open_clip_config.json`` + ``open_clip_model.safetensors``, what
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads, for stock and our own
  architectures.
* ``pt``: ``model.pt`` (plain open_clip state dict, what ``model.pretrained=FILE`` and
  ``ARCH:FILE`` take) + ``open_clip_config.json`` (``local-dir:DIR`` for orbitclip). Replaces
  ``python -m train.engines.deepspeed.export``, which stays as the low-level ZeRO tool.

Every export also writes ``README.md`` (a model card naming the source run, weights and
config) and, from a run, ``orbitclip_config.yaml`` (the config that trained it). The folder
is written beside ``DIR`` and renamed into place only after it loaded back through the
target library and reproduced the source's image and text embeddings (cosine >= 0.9999).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from train.core.config import Config, load_config
from train.core.errors import UserError
from train.core.rundir import CheckpointDir, RunDir, parse_step
from train.model import (
    LOCAL_DIR_CONFIG, ClipBundle, load_model, load_run_weights, save_local_dir, save_model_config,
    saved_step,
)

FORMATS = ("hf", "open_clip", "pt")
MIN_COSINE = 0.9999
"""Exported embeddings must match the source's this closely (fp32; conversions are exact up to rounding)."""
CARD = "README.md"
RUN_CONFIG_COPY = "orbitclip_config.yaml"
_PROBE_TEXTS = ["an aerial photo of a harbour with boats", "dense residential area", "a farmland", "x"]


class ExportError(UserError, ValueError):
    """The source cannot be exported in the requested format, or the output folder is unusable."""


class CheckFailed(RuntimeError):
    """The written folder did not reproduce the source (a bug in a converter, not the user's)."""


@dataclass
class Source:
    """A model to export and where it came from (for the model card)."""

    bundle: ClipBundle
    label: str
    """What the user named."""
    weights: str
    """The file or folder the weights were read from."""
    run: RunDir | None = None
    step: int | None = None


@dataclass
class Written:
    """What an export wrote and how it was checked."""

    folder: Path
    fmt: str
    files: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- sources


def _zero_meta(folder: Path) -> bool:
    from train.engines.deepspeed.export import META_FILE

    return (folder / META_FILE).is_file()


def _from_checkpoint(ckpt: CheckpointDir, run: RunDir | None, label: str) -> Source:
    """A step folder: its consolidated ``model.pt``, else its ZeRO shards gathered offline."""
    if ckpt.model.is_file():
        return Source(load_model(str(ckpt.model)), label, str(ckpt.model), run, ckpt.step)
    if run is None:
        raise ExportError(f"{ckpt.path}: a checkpoint folder outside any run directory (no config.yaml above it)")
    if not _zero_meta(ckpt.path):
        raise ExportError(f"{ckpt.path}: no model.pt and no DeepSpeed shards; not a checkpoint of ours")
    from train.engines.deepspeed.export import ExportError as ZeroExportError
    from train.engines.deepspeed.export import export_state_dict

    try:
        state = export_state_dict(ckpt.path)
    except ZeroExportError as e:
        raise ExportError(str(e)) from None
    origin = f"{ckpt.path} (ZeRO shards, consolidated)"
    return Source(load_run_weights(run.path, state, origin), label, origin, run, ckpt.step)


def _from_run(run: RunDir, label: str) -> Source:
    """The final ``model.pt``; the latest checkpoint if there is none or it is newer (a continued run)."""
    latest = run.latest()
    final_step = saved_step(run.path)
    if run.final_model.is_file() and (latest is None or final_step is None or latest.step <= final_step):
        return Source(load_model(str(run.final_model)), label, str(run.final_model), run, final_step)
    if latest is None:
        raise ExportError(f"{run.path}: no model.pt and no checkpoint yet (checkpoints/latest is missing)")
    return _from_checkpoint(latest, run, label)


def resolve_source(text: str) -> Source:
    """Load what ``SOURCE`` names (see the module docstring)."""
    path = Path(text)
    if not path.exists():
        return Source(load_model(text), text, text)  # a model spec: ARCH, ARCH:FILE, local-dir:, hf:
    run = RunDir.containing(path)
    if path.is_file():
        return Source(load_model(str(path)), text, str(path), run, parse_step(path.parent.name))
    if RunDir(path).is_run():
        return _from_run(RunDir(path), text)
    if parse_step(path.name) is not None or (path / "model.pt").is_file() or _zero_meta(path):
        return _from_checkpoint(CheckpointDir(path), run, text)
    if path.name == "checkpoints" and run is not None and run.latest() is not None:
        return _from_checkpoint(run.latest(), run, text)
    if (path / LOCAL_DIR_CONFIG).is_file():
        return Source(load_model(f"local-dir:{path}"), text, str(path))
    if (path / "config.json").is_file():
        return Source(load_model(f"hf:{path}"), text, str(path))
    raise ExportError(f"{path}: not a run directory, checkpoint folder, open_clip local-dir or transformers folder")


# ----------------------------------------------------------------------------- writers


def _preprocess(bundle: ClipBundle) -> dict[str, Any]:
    import open_clip

    return dict(open_clip.get_model_preprocess_cfg(bundle.model))


def hf_refusal(bundle: ClipBundle) -> str | None:
    """Why a transformers ``CLIPModel`` cannot hold this model, or None if it can."""
    from train.model.hf import ConversionError, hf_config_from_open_clip

    if getattr(bundle.model, "logit_bias", None) is not None:
        return ("it has a logit_bias (SigLIP loss), which transformers' CLIPModel lacks, and SiglipModel is "
                "another architecture (attention-pool head, no class token)")
    try:
        hf_config_from_open_clip(bundle.model_cfg)
    except ConversionError as e:
        return str(e)
    if bundle.model_cfg["text_cfg"].get("vocab_size", 49408) != 49408:
        return "its text tower does not use CLIP's BPE vocabulary, so no CLIPTokenizer can be written"
    return None


def write_hf(bundle: ClipBundle, folder: Path) -> None:
    """transformers ``CLIPModel`` + ``CLIPProcessor`` (``save_pretrained`` layout)."""
    from train.model.hf import ConversionError, save_hf_clip

    reason = hf_refusal(bundle)
    if reason:
        raise ExportError(f"cannot export {bundle.arch} as a transformers CLIPModel: {reason}; "
                          "use --format open_clip")
    try:
        save_hf_clip(bundle.model, bundle.model_cfg, folder, mean=bundle.mean, std=bundle.std,
                     preprocess=_preprocess(bundle))
    except ConversionError as e:
        raise ExportError(f"cannot export {bundle.arch} as hf: {e}; use --format open_clip") from None


def write_open_clip(bundle: ClipBundle, folder: Path) -> None:
    """open_clip's ``local-dir:`` layout (plus the tokenizer files of an HF-tokenizer model)."""
    from open_clip.tokenizer import HFTokenizer

    save_local_dir(bundle, folder)
    if isinstance(bundle.tokenizer, HFTokenizer):  # open_clip reads these from the folder itself
        bundle.tokenizer.tokenizer.save_pretrained(folder)


def write_pt(bundle: ClipBundle, folder: Path) -> None:
    """``model.pt`` (plain open_clip state dict) + ``open_clip_config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()},
               folder / "model.pt")
    save_model_config(bundle, folder)


WRITERS: dict[str, Callable[[ClipBundle, Path], None]] = {"hf": write_hf, "open_clip": write_open_clip,
                                                          "pt": write_pt}


# ----------------------------------------------------------------------------- checks


def _probe_images(bundle: ClipBundle) -> tuple[torch.Tensor, Any]:
    """Random normalized pixels, and one PIL image of the model's size (for preprocessing)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, bundle.image_size, bundle.image_size, generator=g)
    rgb = torch.randint(0, 256, (bundle.image_size, bundle.image_size, 3), generator=g, dtype=torch.uint8)
    return pixels, Image.fromarray(rgb.numpy())


def _ours(bundle: ClipBundle, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (bundle.model.encode_image(pixels, normalize=True),
                bundle.model.encode_text(bundle.tokenizer(_PROBE_TEXTS), normalize=True))


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def _compare(what: str, ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor],
             pixels_ours: torch.Tensor, pixels_theirs: torch.Tensor) -> str:
    """One check line; raises when embeddings or preprocessing differ."""
    image, text = _min_cosine(ours[0], theirs[0]), _min_cosine(ours[1], theirs[1])
    pre = float((pixels_ours - pixels_theirs).abs().max())
    if min(image, text) < MIN_COSINE or pre > 1e-4:
        raise CheckFailed(f"the exported model does not reproduce the source ({what}): min cosine image "
                           f"{image:.6f}, text {text:.6f} (need >= {MIN_COSINE}); preprocessing max diff {pre:.2e}")
    return (f"{what} reproduces the source: min cosine image {image:.6f}, text {text:.6f}; "
            f"preprocessing max diff {pre:.1e}")


def check_hf(bundle: ClipBundle, folder: Path) -> str:
    """Load with transformers (offline) and compare embeddings and the processor's pixels."""
    from transformers import CLIPModel, CLIPProcessor

    hf = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    pixels, pil = _probe_images(bundle)
    ids = processor.tokenizer(_PROBE_TEXTS, padding="max_length", truncation=True, return_tensors="pt",
                              max_length=bundle.model_cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        out = hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    theirs_pp = processor.image_processor(images=pil, return_tensors="pt")["pixel_values"][0]
    return _compare("transformers CLIPModel + CLIPProcessor", _ours(bundle, pixels),
                    (out.image_embeds, out.text_embeds), bundle.eval_transform(pil), theirs_pp)


def check_open_clip(bundle: ClipBundle, folder: Path) -> str:
    """Load with open_clip's own ``local-dir:`` loader and compare."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    pixels, pil = _probe_images(bundle)
    with torch.no_grad():
        theirs = (model.encode_image(pixels, normalize=True), model.encode_text(tokenizer(_PROBE_TEXTS), normalize=True))
    return _compare("open_clip local-dir", _ours(bundle, pixels), theirs, bundle.eval_transform(pil), preprocess(pil))


def check_pt(bundle: ClipBundle, folder: Path) -> str:
    """Load with orbitclip's ``local-dir:`` and require identical tensors."""
    back = load_model(f"local-dir:{folder}")
    ours, theirs = bundle.model.state_dict(), back.model.state_dict()
    different = [k for k in ours if k not in theirs or not torch.equal(ours[k].cpu(), theirs[k])]
    if different or ours.keys() != theirs.keys():
        raise CheckFailed(f"model.pt does not hold the source's tensors: {different[:5]}")
    return f"model.pt holds the source's {len(ours)} tensors bit for bit"


CHECKS: dict[str, Callable[[ClipBundle, Path], str]] = {"hf": check_hf, "open_clip": check_open_clip,
                                                        "pt": check_pt}


# ----------------------------------------------------------------------------- model card


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orbitclip")
    except PackageNotFoundError:
        return "unknown"


def _architecture(bundle: ClipBundle) -> str:
    v, t = bundle.model_cfg.get("vision_cfg", {}), bundle.model_cfg.get("text_cfg", {})
    if "timm_model_name" in v or "hf_model_name" in t or not isinstance(v.get("layers"), int):
        return f"`{bundle.arch}` (see {LOCAL_DIR_CONFIG} or config.json)"
    return (f"`{bundle.arch}`: ViT width {v.get('width')} x {v.get('layers')} layers, patch {v.get('patch_size')}, "
            f"{bundle.image_size} px; text width {t.get('width')} x {t.get('layers')} layers, context "
            f"{t.get('context_length')}; embedding {bundle.model_cfg.get('embed_dim')}")


def _training_lines(cfg: Config) -> list[str]:
    data = (f"{cfg.data.synthetic_samples} synthetic scenes" if cfg.data.source == "synthetic"
            else ", ".join(f"`{s.path}` ({s.split})" for s in cfg.data.shards))
    length = f"{cfg.train.steps} steps" if cfg.train.steps is not None else f"{cfg.train.epochs} epochs"
    return [
        f"- model: `{cfg.model.name}`" + (f", from `{cfg.model.pretrained}`" if cfg.model.pretrained else ""),
        f"- data: {data}",
        f"- {length}, batch {cfg.data.batch_size} per rank, {cfg.loss.kind} loss, {cfg.optim.name} lr {cfg.optim.lr}",
    ]


_USAGE = {
    "hf": '''```python
from transformers import CLIPModel, CLIPProcessor

model = CLIPModel.from_pretrained("{out}")
processor = CLIPProcessor.from_pretrained("{out}")
inputs = processor(text=["an aerial photo of a harbour"], images=image, return_tensors="pt", padding=True)
probs = model(**inputs).logits_per_image.softmax(dim=-1)
```

In orbitclip: `python -m eval run --model hf:{out} ...`, or fine-tune with `model.pretrained=hf:{out}`.''',
    "open_clip": '''```python
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
tokenizer = open_clip.get_tokenizer("local-dir:{out}")
```

In orbitclip: `python -m eval run --model local-dir:{out} ...`, or `model.pretrained=local-dir:{out}`.''',
    "pt": '''`model.pt` is a plain open_clip state dict (`torch.load(path, weights_only=True)`).
In orbitclip: `--model local-dir:{out}` or `model.pretrained=local-dir:{out}`; for a registered
architecture also `ARCH:{out}/model.pt`. open_clip's own `local-dir:` loader does not read
`model.pt`: export with `--format open_clip` for it.''',
}
_FORMAT_NAMES = {"hf": "transformers CLIPModel + CLIPProcessor", "open_clip": "open_clip local-dir folder",
                 "pt": "plain open_clip state dict (model.pt)"}


def model_card(source: Source, fmt: str, out: Path) -> str:
    """README.md of the export folder: what it is, where it came from, how to load it."""
    b = source.bundle
    step = f" (step {source.step})" if source.step is not None else ""
    rows = [
        f"| source | `{source.label}` |",
        f"| weights | `{source.weights}`{step} |",
    ]
    if source.run is not None:
        rows.append(f"| run | `{source.run.path}`, config `{source.run.config}` (copied here as `{RUN_CONFIG_COPY}`) |")
    rows += [
        f"| architecture | {_architecture(b)} |",
        f"| preprocessing | {b.image_size} px, mean {tuple(round(x, 4) for x in b.mean)}, "
        f"std {tuple(round(x, 4) for x in b.std)} |",
        f"| exported | {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, orbitclip {_version()}, "
        f"`python -m train export {source.label} --format {fmt}` |",
    ]
    library = {"hf": "transformers", "open_clip": "open_clip", "pt": "pytorch"}[fmt]
    text = [
        "---", f"library_name: {library}", "tags: [clip, remote-sensing, earth-observation, orbitclip]", "---", "",
        f"# {out.name}", "", f"A CLIP model exported by orbitclip as a {_FORMAT_NAMES[fmt]}.", "",
        "| | |", "|---|---|", *rows, "",
    ]
    if source.run is not None:
        text += ["## Training (from the run's config)", "", *_training_lines(load_config(source.run.config)), ""]
    text += ["## Load", "", _USAGE[fmt].format(out=out), ""]
    return "\n".join(text)


def _write_card(source: Source, fmt: str, folder: Path, out: Path) -> None:
    (folder / CARD).write_text(model_card(source, fmt, out))
    if source.run is not None:
        shutil.copyfile(source.run.config, folder / RUN_CONFIG_COPY)


# ----------------------------------------------------------------------------- export


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder")
    if (out / "config.yaml").is_file() or (out / "checkpoints").exists():
        raise ExportError(f"--out {out} looks like a run directory; refusing to write into it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def export(source: Source, fmt: str, out: str | Path, overwrite: bool = False, check: bool = True) -> Written:
    """Write ``source`` in ``fmt`` to ``out``: built beside it, checked, then renamed into place.

    Raises:
        ExportError: an unknown format, a model the format cannot represent, or an unusable ``out``.
        CheckFailed: the written folder did not reproduce the source (nothing is left at ``out``).
    """
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _prepare_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        WRITERS[fmt](source.bundle, tmp)
        _write_card(source, fmt, tmp, out)
        checks = [CHECKS[fmt](source.bundle, tmp)] if check else []
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Written(out, fmt, sorted(p.name for p in out.iterdir()), checks)


# ----------------------------------------------------------------------------- report


_GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("model", lambda n: n in ("config.json", LOCAL_DIR_CONFIG, "generation_config.json", "model.pt")
     or n.endswith((".safetensors", ".safetensors.index.json", ".bin"))),
    ("tokenizer", lambda n: n.startswith("tokenizer") or n in ("vocab.json", "merges.txt", "special_tokens_map.json",
                                                               "added_tokens.json", "spiece.model")),
    ("processor", lambda n: n in ("processor_config.json", "preprocessor_config.json")),
    ("card", lambda n: n in (CARD, RUN_CONFIG_COPY)),
]


def _size(folder: Path, names: list[str]) -> str:
    total = sum((folder / n).stat().st_size for n in names)
    return f"{total / 1e6:.1f} MB" if total >= 1e5 else f"{total / 1e3:.1f} kB"


def summary(written: Written, source: Source) -> list[str]:
    """What was written: a header line, one line per file group, one per check."""
    b = source.bundle
    step = f", step {source.step}" if source.step is not None else ""
    lines = [f"exported {source.weights}{step} -> {written.folder} ({_FORMAT_NAMES[written.fmt]})"]
    left = list(written.files)
    for group, match in _GROUPS:
        names = [n for n in left if match(n)]
        left = [n for n in left if n not in names]
        if not names:
            continue
        note = {"model": _size(written.folder, names),
                "processor": f"{b.image_size} px, mean {tuple(round(x, 3) for x in b.mean)}, "
                             f"std {tuple(round(x, 3) for x in b.std)}"}.get(group, "")
        lines.append(f"  {group:<10} {' '.join(names)}" + (f"  ({note})" if note else ""))
    if left:
        lines.append(f"  {'other':<10} {' '.join(left)}")
    lines += [f"  {'checked':<10} {c}" for c in written.checks]
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train export",
        description="Export a run, checkpoint or model as a transformers CLIPModel folder (hf), an open_clip "
                    "local-dir folder (open_clip) or a plain state dict (pt).",
        epilog="example: python -m train export runs/demo --format hf --out runs/demo-hf",
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="run directory, step folder, checkpoint file, or a model spec (ARCH[:FILE], local-dir:DIR, "
                        "hf:DIR)")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf, open_clip or pt")
    p.add_argument("--out", required=True, help="output folder (created; written beside it and renamed into place)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip loading the result back and comparing embeddings")
    return p


def _quiet_libraries() -> None:
    """transformers' progress bars and open_clip's INFO lines would bury the summary."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # only the hf format needs transformers
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m train export``; returns the exit code (2 for user errors)."""
    from train.model.hf import ConversionError

    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        _prepare_out(Path(args.out), args.overwrite)  # before the (slow) model load
        source = resolve_source(args.source)
        written = export(source, args.format, args.out, overwrite=args.overwrite, check=args.check)
    except (UserError, FileNotFoundError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary(written, source)), flush=True)
    return 0


__all__ = ["CheckFailed", "ExportError", "FORMATS", "Source", "Written", "export", "hf_refusal", "main", "model_card",
           "resolve_source", "summary"]
