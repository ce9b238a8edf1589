"""Convert between transformers' ``CLIPModel`` and open_clip's ``CLIP`` (ViT towers).

open_clip ships no converter for Hugging Face CLIP checkpoints. The two models compute
the same function; only names and layouts differ:

* HF has separate ``q_proj/k_proj/v_proj``; open_clip (``nn.MultiheadAttention``) one
  stacked ``in_proj_weight`` in q, k, v order.
* HF projections are bias-free ``nn.Linear`` (``[out, in]``); open_clip keeps raw
  matrices used as ``x @ proj`` (``[in, out]``), hence the transposes.
* HF text pooling picks the first ``eos_token_id`` (or, for the legacy value 2, the
  argmax token id); open_clip's ``argmax`` pool equals the former whenever the EOT id is
  the largest id in the vocabulary (CLIP's BPE: 49407 of 49408), else we use its ``eos``
  pool with the same id.
* HF's ``position_ids`` are index buffers, not weights: older checkpoints store them,
  they are dropped.

Everything else (pre-LN blocks, class token, ``pre_layrnorm`` = ``ln_pre``,
``post_layernorm`` applied to the class token = ``ln_post`` then ``tok`` pooling, causal
text mask) is the same computation. Tested for exact feature equality both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

import train.core.compat

train.core.compat.ensure_torchvision()

from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

_DEFAULT_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, what open_clip builds without norm_kwargs
_CLIP_BPE_VOCAB = 49408  # open_clip SimpleTokenizer / CLIP BPE; EOT = 49407 is the largest id
_HF_LEGACY_ARGMAX_EOS = 2  # HF CLIPTextModel pools at argmax(input_ids) for this eos_token_id

# (HF name, open_clip name, transpose) for tensors outside the transformer blocks.
_TOP_LEVEL = [
    ("vision_model.embeddings.class_embedding", "visual.class_embedding", False),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", False),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", False),
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight", False),
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias", False),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight", False),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias", False),
    ("visual_projection.weight", "visual.proj", True),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", False),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", False),
    ("text_model.final_layer_norm.weight", "ln_final.weight", False),
    ("text_model.final_layer_norm.bias", "ln_final.bias", False),
    ("text_projection.weight", "text_projection", True),
    ("logit_scale", "logit_scale", False),
]
# Per transformer block: HF suffix -> open_clip suffix (q/k/v are handled separately).
_BLOCK = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_TOWERS = [("vision_model.encoder.layers.", "visual.transformer.resblocks."),
           ("text_model.encoder.layers.", "transformer.resblocks.")]


class ConversionError(ValueError):
    """The checkpoint or config cannot be expressed in the other library's CLIP."""


# ----------------------------------------------------------------------------- configs


def _activation(hidden_act: str, where: str) -> bool:
    """HF activation name -> open_clip ``quick_gelu`` flag."""
    if hidden_act == "quick_gelu":
        return True
    if hidden_act == "gelu":  # HF "gelu" is the exact erf GELU, as is torch.nn.GELU()
        return False
    raise ConversionError(f"{where}.hidden_act={hidden_act!r}: only 'quick_gelu' and 'gelu' exist in open_clip")


def _mlp_ratio(hidden: int, intermediate: int, where: str) -> float:
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:  # open_clip builds int(width * mlp_ratio)
        raise ConversionError(f"{where}: intermediate_size {intermediate} is not reproducible from width {hidden}")
    return ratio


def open_clip_config_from_hf(config: Any) -> dict[str, Any]:
    """Build the open_clip model config (``open_clip_config.json``'s ``model_cfg``) of a HF CLIP.

    Args:
        config: a ``transformers.CLIPConfig``.

    Returns:
        A dict accepted by ``open_clip.CLIP(**cfg)``.
    """
    v, t = config.vision_config, config.text_config
    quick = {_activation(v.hidden_act, "vision_config"), _activation(t.hidden_act, "text_config")}
    if len(quick) != 1:
        raise ConversionError("open_clip uses one activation for both towers; the HF towers differ "
                              f"({v.hidden_act!r} vs {t.hidden_act!r})")
    if v.num_channels != 3:
        raise ConversionError(f"vision_config.num_channels={v.num_channels}: open_clip ViTs take RGB")
    vision_cfg: dict[str, Any] = {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "width": v.hidden_size,
        "layers": v.num_hidden_layers,
        "head_width": v.hidden_size // v.num_attention_heads,
        "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size, "vision_config"),
    }
    text_cfg: dict[str, Any] = {
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "width": t.hidden_size,
        "heads": t.num_attention_heads,
        "layers": t.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(t.hidden_size, t.intermediate_size, "text_config"),
    }
    for cfg, sub in ((vision_cfg, v), (text_cfg, t)):
        eps = sub.layer_norm_eps if sub.layer_norm_eps is not None else _DEFAULT_LN_EPS
        if eps != _DEFAULT_LN_EPS:
            cfg["norm_kwargs"] = {"eps": eps}
    eos = t.eos_token_id
    if isinstance(eos, (list, tuple)):
        raise ConversionError(f"text_config.eos_token_id={eos}: a single EOT id is needed for pooling")
    if eos == _HF_LEGACY_ARGMAX_EOS or eos == t.vocab_size - 1:
        text_cfg["pool_type"] = "argmax"  # identical: the first EOT is the (first) largest id
    else:
        text_cfg.update(pool_type="eos", eos_id=eos)
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": quick.pop(),
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }


def _check_supported(model_cfg: Mapping[str, Any]) -> tuple[CLIPVisionCfg, CLIPTextCfg]:
    """Reject open_clip features that HF's CLIPModel cannot express (error names them)."""
    problems = []
    for key in ("custom_text", "multimodal_cfg", "nonscalar_logit_scale"):
        if model_cfg.get(key):
            problems.append(key)
    vc = CLIPVisionCfg(**model_cfg["vision_cfg"])
    tc = CLIPTextCfg(**model_cfg["text_cfg"])
    vision_bad = {
        "timm_model_name": vc.timm_model_name is not None, "layers": not isinstance(vc.layers, int),
        "ls_init_value": vc.ls_init_value is not None, "attentional_pool": bool(vc.attentional_pool),
        "no_ln_pre": vc.no_ln_pre, "pos_embed_type": vc.pos_embed_type != "learnable",
        "final_ln_after_pool": vc.final_ln_after_pool, "pool_type": vc.pool_type != "tok",
        "act_kwargs": bool(vc.act_kwargs), "image_size": not isinstance(vc.image_size, int),
        "patch_size": not isinstance(vc.patch_size, int),
    }
    text_bad = {
        "hf_model_name": tc.hf_model_name is not None, "ls_init_value": tc.ls_init_value is not None,
        "embed_cls": tc.embed_cls, "no_causal_mask": tc.no_causal_mask,
        "final_ln_after_pool": tc.final_ln_after_pool, "pool_type": tc.pool_type not in ("argmax", "eos"),
        "proj_bias": tc.proj_bias, "proj_type": tc.proj_type != "linear", "act_kwargs": bool(tc.act_kwargs),
    }
    for prefix, cfg, bad in (("vision_cfg", vc, vision_bad), ("text_cfg", tc, text_bad)):
        custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                              "scale_attn", "scale_fc") if getattr(cfg, k)]
        bad.update({k: True for k in custom})
        bad["block_type"] = cfg.block_type not in (None, "default")
        bad["norm_kwargs"] = bool(set(cfg.norm_kwargs or {}) - {"eps"})
        problems += [f"{prefix}.{k}" for k, is_bad in bad.items() if is_bad]
    if problems:
        raise ConversionError(f"not expressible as a transformers CLIPModel: {', '.join(problems)}")
    return vc, tc


def hf_config_from_open_clip(model_cfg: Mapping[str, Any], logit_scale_init: float = 2.6592) -> Any:
    """Build a ``transformers.CLIPConfig`` for an open_clip ViT CLIP model config."""
    from transformers import CLIPConfig

    vc, tc = _check_supported(model_cfg)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    if tc.pool_type == "eos":
        eos = tc.eos_id
    else:  # argmax: with CLIP's BPE the EOT is the largest id, else HF's legacy argmax value
        eos = tc.vocab_size - 1 if tc.vocab_size == _CLIP_BPE_VOCAB else _HF_LEGACY_ARGMAX_EOS
    text = {
        "vocab_size": tc.vocab_size, "hidden_size": tc.width, "num_hidden_layers": tc.layers,
        "num_attention_heads": tc.heads, "intermediate_size": int(tc.width * tc.mlp_ratio),
        "max_position_embeddings": tc.context_length, "hidden_act": act,
        "layer_norm_eps": (tc.norm_kwargs or {}).get("eps", _DEFAULT_LN_EPS), "eos_token_id": eos,
        "projection_dim": model_cfg["embed_dim"],
    }
    if tc.vocab_size != _CLIP_BPE_VOCAB:  # CLIP's bos/pad ids would lie outside a custom vocabulary
        text.update(bos_token_id=None, pad_token_id=None)
    vision = {
        "hidden_size": vc.width, "num_hidden_layers": vc.layers, "num_attention_heads": vc.width // vc.head_width,
        "intermediate_size": int(vc.width * vc.mlp_ratio), "image_size": vc.image_size,
        "patch_size": vc.patch_size, "hidden_act": act,
        "layer_norm_eps": (vc.norm_kwargs or {}).get("eps", _DEFAULT_LN_EPS),
        "projection_dim": model_cfg["embed_dim"],
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg["embed_dim"],
                      logit_scale_init_value=logit_scale_init)


# ------------------------------------------------------------------------ state dicts


def _mismatch(what: str, leftovers: list[str]) -> ConversionError:
    shown = ", ".join(sorted(leftovers)[:12]) + (" ..." if len(leftovers) > 12 else "")
    return ConversionError(f"{what} ({len(leftovers)}): {shown}")


def hf_to_open_clip_state_dict(hf_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/reshape a HF ``CLIPModel`` state dict into open_clip ``CLIP`` keys.

    Raises:
        ConversionError: keys that neither library layout explains (nothing is dropped
            silently except the ``position_ids`` index buffers).
    """
    src = {k: v for k, v in hf_sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    for hf_key, oc_key, transpose in _TOP_LEVEL:
        if hf_key in src:
            t = src.pop(hf_key)
            out[oc_key] = t.t().contiguous() if transpose else t
    for hf_prefix, oc_prefix in _TOWERS:
        layer_ids = sorted({int(m.group(1)) for k in src if (m := re.match(re.escape(hf_prefix) + r"(\d+)\.", k))})
        for i in layer_ids:
            h, o = f"{hf_prefix}{i}.", f"{oc_prefix}{i}."
            for kind in ("weight", "bias"):
                qkv = [f"{h}self_attn.{p}_proj.{kind}" for p in "qkv"]
                if all(k in src for k in qkv):
                    out[f"{o}attn.in_proj_{kind}"] = torch.cat([src.pop(k) for k in qkv], dim=0)
            for hf_suffix, oc_suffix in _BLOCK.items():
                if h + hf_suffix in src:
                    out[o + oc_suffix] = src.pop(h + hf_suffix)
    if src:
        raise _mismatch("HF CLIP tensors with no open_clip counterpart", list(src))
    return out


def open_clip_to_hf_state_dict(oc_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_open_clip_state_dict` (open_clip ``CLIP`` -> HF ``CLIPModel``)."""
    src = dict(oc_sd)
    out: dict[str, torch.Tensor] = {}
    for hf_key, oc_key, transpose in _TOP_LEVEL:
        if oc_key in src:
            t = src.pop(oc_key)
            out[hf_key] = t.t().contiguous() if transpose else t
    for hf_prefix, oc_prefix in _TOWERS:
        layer_ids = sorted({int(m.group(1)) for k in src if (m := re.match(re.escape(oc_prefix) + r"(\d+)\.", k))})
        for i in layer_ids:
            h, o = f"{hf_prefix}{i}.", f"{oc_prefix}{i}."
            for kind in ("weight", "bias"):
                if f"{o}attn.in_proj_{kind}" in src:
                    q, k, v = src.pop(f"{o}attn.in_proj_{kind}").chunk(3, dim=0)
                    for name, t in zip("qkv", (q, k, v)):
                        out[f"{h}self_attn.{name}_proj.{kind}"] = t.contiguous()
            for hf_suffix, oc_suffix in _BLOCK.items():
                if o + oc_suffix in src:
                    out[h + hf_suffix] = src.pop(o + oc_suffix)
    if src:
        raise _mismatch("open_clip tensors with no HF CLIPModel counterpart (e.g. logit_bias)", list(src))
    return out


# ------------------------------------------------------------------------ folders


def load_hf_clip(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a transformers CLIP folder (``save_pretrained`` layout) offline.

    Returns:
        ``(model_cfg, state_dict)`` in open_clip form.
    """
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"hf:{folder}: no config.json (expected a transformers save_pretrained folder)")
    config = CLIPConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "model_type", None) != "clip":
        raise ConversionError(f"hf:{folder}: model_type={config.model_type!r}, only 'clip' is supported")
    hf = CLIPModel.from_pretrained(folder, local_files_only=True)
    return open_clip_config_from_hf(hf.config), hf_to_open_clip_state_dict(hf.state_dict())


def open_clip_to_hf_model(model: torch.nn.Module, model_cfg: Mapping[str, Any]) -> Any:
    """Return a ``transformers.CLIPModel`` computing the same features as ``model``."""
    from transformers import CLIPModel

    config = hf_config_from_open_clip(model_cfg)
    hf = CLIPModel(config)
    sd = open_clip_to_hf_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if sd["logit_scale"].ndim != hf.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(hf.logit_scale.shape)
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def clip_tokenizer(context_length: int) -> Any:
    """A transformers ``CLIPTokenizer`` built offline from open_clip's bundled BPE.

    Ids match open_clip's ``SimpleTokenizer`` (only padding differs: HF pads with EOT).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values HF stores


def hf_image_processor(image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                       interpolation: str = "bicubic", resize_mode: str = "shortest") -> Any:
    """A ``CLIPImageProcessor`` doing what open_clip's eval transform does for this model.

    Args:
        image_size: the model's input size (square).
        mean, std: the model's normalisation.
        interpolation, resize_mode: open_clip preprocess settings (``shortest``: resize the
            short side, centre crop; ``squash``: resize to a square, no crop).
    """
    from transformers import CLIPImageProcessor

    if interpolation not in _PIL_RESAMPLE:
        raise ConversionError(f"interpolation {interpolation!r} has no CLIPImageProcessor equivalent")
    if resize_mode == "shortest":
        size, crop = {"shortest_edge": image_size}, True
    elif resize_mode == "squash":
        size, crop = {"height": image_size, "width": image_size}, False
    else:  # "longest" pads to a square: CLIPImageProcessor cannot pad
        raise ConversionError(f"resize_mode {resize_mode!r} has no CLIPImageProcessor equivalent")
    return CLIPImageProcessor(
        do_resize=True, size=size, resample=_PIL_RESAMPLE[interpolation], do_center_crop=crop,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, do_normalize=True,
        image_mean=list(mean), image_std=list(std), do_convert_rgb=True,
    )


def save_hf_clip(model: torch.nn.Module, model_cfg: Mapping[str, Any], folder: str | Path,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 preprocess: Mapping[str, Any] | None = None) -> Path:
    """Export an open_clip ViT CLIP as a transformers folder (model, tokenizer, processor).

    Args:
        model: open_clip ``CLIP`` (no ``logit_bias``: HF CLIPModel has none).
        model_cfg: its open_clip model config.
        folder: output folder (created).
        mean, std: normalisation of the image processor (None = write the tokenizer only).
        preprocess: open_clip preprocess settings (``interpolation``, ``resize_mode``) to mirror.
    """
    from transformers import CLIPProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    open_clip_to_hf_model(model, model_cfg).save_pretrained(folder)
    if model_cfg["text_cfg"].get("vocab_size", _CLIP_BPE_VOCAB) != _CLIP_BPE_VOCAB:
        return folder  # no tokenizer we can write for another vocabulary
    tokenizer = clip_tokenizer(model_cfg["text_cfg"].get("context_length", 77))
    if mean is None or std is None:
        tokenizer.save_pretrained(folder)
        return folder
    pp = dict(preprocess or {})
    image_processor = hf_image_processor(model_cfg["vision_cfg"]["image_size"], mean, std,
                                         pp.get("interpolation", "bicubic"), pp.get("resize_mode", "shortest"))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def read_hf_preprocess(folder: str | Path) -> dict[str, Any]:
    """Mean/std of a HF folder's image processor as open_clip preprocess keys.

    transformers 5 nests it in ``processor_config.json``; older versions (and hand-written
    folders) have ``preprocessor_config.json``.
    """
    folder = Path(folder)
    data: dict[str, Any] = {}
    if (folder / "preprocessor_config.json").is_file():
        data = json.loads((folder / "preprocessor_config.json").read_text())
    elif (folder / "processor_config.json").is_file():
        data = json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
    if "image_mean" in data and "image_std" in data:
        return {"mean": tuple(data["image_mean"]), "std": tuple(data["image_std"])}
    return {}


__all__ = [
    "ConversionError", "open_clip_config_from_hf", "hf_config_from_open_clip", "hf_to_open_clip_state_dict",
    "open_clip_to_hf_state_dict", "load_hf_clip", "open_clip_to_hf_model", "clip_tokenizer", "save_hf_clip",
    "hf_image_processor", "read_hf_preprocess",
]
