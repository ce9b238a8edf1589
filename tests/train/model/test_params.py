"""The one no-decay rule (train/model/params.py), on real open_clip parameter names."""

from __future__ import annotations

import torch

from train.core.config import ModelConfig
from train.model import build_model
from train.model.params import is_no_decay, no_decay_names

ARCH = "orbit-micro"


def test_no_decay_rule_on_open_clip_names(micro_clip):
    decayed = {n for n, p in micro_clip.named_parameters() if not is_no_decay(n, p)}
    # Only matrices of linear/conv layers and the projections are decayed.
    expected_suffixes = ("proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight", "conv1.weight")
    assert {"text_projection", "visual.proj"} <= decayed
    for name in decayed - {"text_projection", "visual.proj"}:
        assert name.endswith(expected_suffixes), name
    for name in ("logit_scale", "positional_embedding", "token_embedding.weight", "visual.class_embedding",
                 "visual.positional_embedding", "visual.ln_pre.weight", "ln_final.bias",
                 "transformer.resblocks.0.attn.in_proj_bias"):
        assert name not in decayed, name
    # A 2-D norm-named weight is still not decayed; a 2-D matrix named like a norm's neighbour is.
    assert is_no_decay("blocks.0.norm1.weight", torch.zeros(2, 2))
    assert not is_no_decay("blocks.0.attn.in_proj_weight", torch.zeros(2, 2))


def test_no_decay_names_of_a_built_model():
    model = build_model(ModelConfig(name=ARCH, init_logit_bias=-10.0)).model
    names = no_decay_names(model)
    for n in ("logit_scale", "logit_bias", "visual.class_embedding", "visual.positional_embedding",
              "token_embedding.weight", "positional_embedding", "ln_final.weight", "visual.ln_pre.bias",
              "visual.transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.mlp.c_fc.bias"):
        assert n in names, n
    decayed = {n for n, _ in model.named_parameters()} - names
    suffixes = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert decayed == {"visual.conv1.weight", "visual.proj", "text_projection"} | {
        n for n in decayed if n.endswith(suffixes)}
    assert sum(n.endswith(suffixes) for n in decayed) == 4 * 3  # 2 vision + 1 text blocks



def test_model_own_no_weight_decay_list_is_honoured():
    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(4, 4))  # 2-D, not named like an embedding
            self.w = torch.nn.Parameter(torch.zeros(4, 4))

        def no_weight_decay(self) -> set[str]:
            return {"table"}

    assert no_decay_names(Tower()) == {"table"}
