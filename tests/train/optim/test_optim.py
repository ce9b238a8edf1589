"""Optimizer parameter groups and learning-rate schedules (train/optim)."""

from __future__ import annotations

import math

import pytest
import torch

from train.core.config import OptimConfig
from train.model.params import is_no_decay
from train.optim.optimizer import build_optimizer, param_groups
from train.optim.schedule import build_scheduler, lr_at, warmup_steps_for



def test_param_groups_cover_trainable_params_once(micro_clip):
    groups = param_groups(micro_clip, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for _ in micro_clip.parameters())
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(micro_clip.logit_scale) in no_decay and id(micro_clip.visual.proj) not in no_decay


def test_adamw_decays_only_the_decay_group(micro_clip):
    model = micro_clip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only the decoupled decay moves weights
    opt.step()
    try:
        for n, p in model.named_parameters():
            if is_no_decay(n, p):
                assert torch.equal(p, before[n]), n
            else:
                torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5)), n
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])


def test_frozen_params_are_excluded(micro_clip):
    model = micro_clip
    for p in model.visual.parameters():
        p.requires_grad_(False)
    try:
        opt = build_optimizer(model, OptimConfig())
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not in_opt & {id(p) for p in model.visual.parameters()}
        assert id(model.token_embedding.weight) in in_opt
        for p in model.parameters():
            p.requires_grad_(False)
        with pytest.raises(ValueError, match="no trainable parameters"):
            build_optimizer(model, OptimConfig())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("adafactor", torch.optim.Adafactor)])
def test_optimizer_kinds(micro_clip, name, cls):
    opt = build_optimizer(micro_clip, OptimConfig(name=name, lr=5e-6, weight_decay=0.01))
    assert type(opt) is cls
    assert [g["lr"] for g in opt.param_groups] == [5e-6, 5e-6]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


# ----- schedules -----

def _cfg(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1.0, "min_lr": 0.0, **kw})


def test_warmup_is_linear_and_reaches_lr():
    cfg = _cfg(warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_steps_for(_cfg(warmup_steps=2, warmup_fraction=0.25), 10) == 3  # ceil(2.5) wins
    assert warmup_steps_for(_cfg(warmup_steps=5, warmup_fraction=0.25), 10) == 5


def test_cosine_values():
    cfg = _cfg(warmup_steps=2, schedule="cosine", min_lr=0.1)
    total = 12  # decay over steps 2..11, progress = (s - 2) / 10
    assert lr_at(2, cfg, total) == pytest.approx(1.0)
    assert lr_at(7, cfg, total) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_at(11, cfg, total) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at(11, cfg, total) > 0.1  # the last step still trains
    assert lr_at(12, cfg, total) == pytest.approx(0.1) == lr_at(500, cfg, total)
    decay = [lr_at(s, cfg, total) for s in range(2, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_linear_and_constant_values():
    lin = _cfg(schedule="linear", lr=5e-5, min_lr=5e-6)
    assert [lr_at(s, lin, 5) for s in range(6)] == pytest.approx([5e-5, 4.1e-5, 3.2e-5, 2.3e-5, 1.4e-5, 5e-6])
    const = _cfg(schedule="constant", lr=3e-4)
    assert {lr_at(s, const, 7) for s in range(20)} == {3e-4}


def test_schedule_edge_cases():
    assert lr_at(0, _cfg(schedule="cosine"), 1) == 1.0  # one-step run trains at full lr
    cfg = _cfg(warmup_steps=10, schedule="cosine")  # warmup longer than the run
    assert [lr_at(s, cfg, 4) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, _cfg(), 10)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, _cfg(), 0)
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, _cfg(min_lr=2.0), 10)
    with pytest.raises(ValueError, match="warmup"):
        lr_at(0, _cfg(warmup_steps=-1), 10)


def test_scheduler_applies_lr_at_each_step_and_resumes():
    cfg = OptimConfig(lr=0.01, min_lr=0.001, warmup_steps=3, schedule="cosine")
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 10)
    seen = []
    for step in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg, 10) for s in range(6)])
    # A fresh optimizer + scheduler loading both states (as the engine does) continues the schedule.
    w2 = torch.nn.Parameter(torch.ones(2))
    opt2 = torch.optim.SGD([w2], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg, 10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for step in range(6, 10):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx([lr_at(s, cfg, 10) for s in range(6, 10)])
    with pytest.raises(ValueError, match="relative to optim.lr"):
        build_scheduler(torch.optim.SGD([w], lr=0.5), cfg, 10)
