"""Keep 0-dim parameters away from DeepSpeed without changing the model users see.

deepspeed 0.19.8 cannot initialize a model with a 0-dim parameter (open_clip's
``logit_scale`` / ``logit_bias``): ``RuntimeError: self.dim() cannot be 0 to view Float
as Byte`` in the initial broadcast. 0.19.7 works. On every version, before
``deepspeed.initialize``, :func:`vectorize_scalar_params` reshapes such parameters to
``[1]`` *in place* (same ``Parameter`` object, so the optimizer built earlier still
holds it; open_clip's ``logit_scale * image @ text.T`` broadcasts the same way) and
installs state_dict hooks so that ``state_dict()`` still shows ``[]`` and
``load_state_dict`` still accepts ``[]``. Keys and shapes as users see them are unchanged.

A parametrization was rejected: it moves the tensor into a child module that ZeRO-3
never gathers (the child's forward never runs).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn


def _to_scalar(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, *, names: tuple[str, ...]) -> None:
    for n in names:
        t = state_dict.get(prefix + n)
        # ZeRO-3 placeholders (shape [0]) pass through untouched.
        if isinstance(t, torch.Tensor) and t.shape == (1,):
            state_dict[prefix + n] = t.reshape(())


def _to_vector(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, names: tuple[str, ...]) -> None:
    for n in names:
        t = state_dict.get(prefix + n)
        if isinstance(t, torch.Tensor) and t.dim() == 0:
            state_dict[prefix + n] = t.reshape(1)


def vectorize_scalar_params(model: nn.Module) -> list[str]:
    """Reshape every 0-dim parameter of ``model`` to ``[1]`` in place; idempotent.

    Returns:
        The dotted names (state_dict keys) of the reshaped parameters, including ones
        reshaped by an earlier call.
    """
    found: list[str] = []
    for mod_name, module in model.named_modules():
        done: tuple[str, ...] = getattr(module, "_orbitclip_scalar_params", ())
        fresh = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 0)
        for n in fresh:
            p = module._parameters[n]
            if p.grad is not None:
                p.grad = p.grad.reshape(1)
            p.data = p.data.reshape(1)
        if fresh:
            module.register_state_dict_post_hook(partial(_to_scalar, names=fresh))
            module.register_load_state_dict_pre_hook(partial(_to_vector, names=fresh))
            module._orbitclip_scalar_params = done + fresh  # type: ignore[attr-defined]
        found += [f"{mod_name}.{n}" if mod_name else n for n in done + fresh]
    return found


def scalar_param_names(model: nn.Module) -> list[str]:
    """Names of parameters that :func:`vectorize_scalar_params` reshaped."""
    return [
        f"{mod_name}.{n}" if mod_name else n
        for mod_name, module in model.named_modules()
        for n in getattr(module, "_orbitclip_scalar_params", ())
    ]


def assert_no_scalar_params(model: nn.Module) -> None:
    """Raise if a 0-dim parameter would reach ``deepspeed.initialize``."""
    bad = [n for n, p in model.named_parameters() if p.dim() == 0]
    if bad:
        raise RuntimeError(f"0-dim parameters would break deepspeed>=0.19.8: {bad}")


def restore_scalar_shapes(state_dict: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Reshape the ``[1]`` entries named in ``names`` back to ``[]`` (for exported dicts)."""
    out = dict(state_dict)
    for n in names:
        if n in out and out[n].numel() == 1:
            out[n] = out[n].reshape(())
    return out
