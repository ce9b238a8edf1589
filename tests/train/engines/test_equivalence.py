"""THE exactness tests: every way of cutting a global batch trains the same model.

(world 1, batch B) is computed here; (world 1, accum 4), (world 2, B/2),
(world 2, B/2, accum 2), (world 4, B/4) and (world 4, B/4, accum 2) must give the
same gradients, reported losses and — after several AdamW steps — parameters, for
the CLIP and the SigLIP loss. A deliberately broken gather and a disabled RNG replay
must make the same comparisons fail, which shows the tests can fail.

Tolerances (fp32): the relative difference of the whole parameter vector is the
contract (<= 1e-5; seen ~2e-7). The update ``theta_T - theta_0`` is compared too, more
strictly (seen <= 2e-5), because parameters barely move in 4 steps. Gradients are
compared per tensor with a small absolute floor: attention key biases have an exactly
zero true gradient (softmax ignores a constant shift), so float noise is all they get.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import train.engines.base
import train.objective.feature_cache
from tests.distutil import run_distributed
from tests.precision import TOLERANCE
from tests.train.engines.equiv_workers import (
    CLIP_GRAD, GLOBAL_BATCH, equivalence_worker, checkpoint_roundtrip, make_batch, make_engine, make_model,
    train_case,
)
from train.core.config import Config
from train.core.distenv import DistEnv
from train.engines import DDPEngine, Engine, EngineParts, build_engine, register_engine
from train.engines.base import autocast_factory, choose_precision, cpu_has_fast_bf16, resolve_precision
from train.objective.feature_cache import cached_forward_backward
from train.objective.forward import ForwardOptions, encode
from train.objective.loss import ClipLoss

TOL_PARAMS, TOL_UPDATE, TOL_LOSS, TOL_GRAD = 1e-5, 1e-4, 1e-5, 1e-4
KINDS = ("clip", "siglip")


def _flat(d: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in d.values()])


def distances(res: dict, ref: dict, init: dict) -> dict[str, float]:
    """How far a run is from the full-batch reference, in each compared quantity."""
    p, q, p0 = _flat(res["params"]), _flat(ref["params"]), _flat(init)
    grad_excess = 0.0
    g_all = np.linalg.norm(_flat(ref["first_grads"]))
    for name, g_ref in ref["first_grads"].items():
        err = np.linalg.norm(res["first_grads"][name] - g_ref)
        grad_excess = max(grad_excess, err / (TOL_GRAD * np.linalg.norm(g_ref) + 1e-6 * g_all))

    def rel_series(key: str) -> float:
        return max(abs(a - b) / abs(b) for a, b in zip(res[key], ref[key]))

    return {
        "params": float(np.linalg.norm(p - q) / np.linalg.norm(q)),
        "update": float(np.linalg.norm(p - q) / np.linalg.norm(q - p0)),
        "loss": rel_series("loss"),
        "grad_norm": rel_series("grad_norm"),
        "logit_scale": rel_series("logit_scale"),
        "grad_excess": float(grad_excess),  # <= 1 means every tensor is within tolerance
    }


def assert_equivalent(res: dict, ref: dict, init: dict) -> None:
    d = distances(res, ref, init)
    assert d["params"] <= TOL_PARAMS, d
    assert d["update"] <= TOL_UPDATE, d
    assert d["loss"] <= TOL_LOSS, d
    assert d["grad_norm"] <= TOL_LOSS, d
    assert d["logit_scale"] <= TOL_LOSS, d
    assert d["grad_excess"] <= 1.0, d
    assert res.get("rank_disagreement", 0.0) == 0.0


@pytest.fixture(scope="module")
def init_states() -> dict[str, dict[str, np.ndarray]]:
    return {k: {n: v.detach().numpy().copy() for n, v in make_model(k).state_dict().items()} for k in KINDS}


@pytest.fixture(scope="module")
def reference(init_states) -> dict:
    """Single process, full global batch, the plain (untiled) loss: the ground truth; plus the
    default tiled loss at (world 1, accum 1 / 4) and the tiled negative control."""
    torch.manual_seed(0)
    out = {(k, 1): train_case(0, 1, init_states[k], k, 1, "plain") for k in KINDS}
    out.update({(k, f"tiled{a}"): train_case(0, 1, init_states[k], k, a) for k in KINDS for a in (1, 4)})
    out[("clip", 4)] = out[("clip", "tiled4")]
    out[("siglip", 4)] = out[("siglip", "tiled4")]
    out[("clip", "broken-lse")] = train_case(0, 1, init_states["clip"], "clip", 1, "broken-lse")
    return out


WORLD_CASES = [(f"{k}-accum{a}", k, a, False) for k in KINDS for a in (1, 2)]
BROKEN_CASES = [(f"{k}-broken", k, 1, True) for k in KINDS] + [("clip-broken-lse", "clip", 2, "broken-lse")]
BF16_CASES = [(f"{k}-accum2-bf16", k, 2, False, "bf16") for k in KINDS]


@pytest.fixture(scope="module")
def world2(init_states, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ckpt_world2")
    return run_distributed(equivalence_worker, 2, init_states, WORLD_CASES + BROKEN_CASES + BF16_CASES,
                           str(folder))[0]


@pytest.fixture(scope="module")
def world4(init_states) -> dict:
    # micro-batch of 1 with accum 2: the smallest cut there is.
    return run_distributed(equivalence_worker, 4, init_states, WORLD_CASES + BROKEN_CASES[:1])[0]


def test_reference_exercises_what_it_should(reference):
    for kind in KINDS:
        ref = reference[(kind, 1)]
        assert ref["grad_norm"][0] > CLIP_GRAD, "clipping never triggers: the clip path is untested"
        assert ref["loss"][0] != ref["loss"][-1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("accum", [1, 4])
def test_world1_tiled_loss_matches_the_plain_full_batch(reference, init_states, kind, accum):
    """The default (tiled, blocks of 3 over batches of 8 and micro-batches of 2) trains the
    same model as the plain loss: gradients, losses and parameters after 4 AdamW steps."""
    assert_equivalent(reference[(kind, f"tiled{accum}")], reference[(kind, 1)], init_states[kind])


@pytest.mark.parametrize("where", ["world1", "world2"])
def test_a_block_left_out_of_the_log_sum_exp_is_detected(request, reference, init_states, where):
    """Negative control for the tiled loss: the same comparisons fail."""
    res = reference[("clip", "broken-lse")] if where == "world1" else request.getfixturevalue("world2")["clip-broken-lse"]
    d = distances(res, reference[("clip", 1)], init_states["clip"])
    assert d["loss"] > TOL_LOSS and d["params"] > TOL_PARAMS and d["grad_excess"] > 1.0, d


# Four processes on two cores: ~30 s of start-up alone, hence "slow" (still run by `make test`).
WORLDS = [2, pytest.param(4, marks=pytest.mark.slow)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [c[0] for c in WORLD_CASES])
def test_distributed_matches_full_batch(request, reference, init_states, world, case):
    results = request.getfixturevalue(f"world{world}")
    kind = case.split("-")[0]
    assert_equivalent(results[case], reference[(kind, 1)], init_states[kind])


@pytest.mark.parametrize("world,kind", [(2, "clip"), (2, "siglip"), pytest.param(4, "clip", marks=pytest.mark.slow)])
def test_broken_gather_is_detected(request, reference, init_states, world, kind):
    """Gradient only to the local rows: the equivalence checks above must fail."""
    res = request.getfixturevalue(f"world{world}")[f"{kind}-broken"]
    d = distances(res, reference[(kind, 1)], init_states[kind])
    assert d["params"] > TOL_PARAMS, d
    assert d["update"] > TOL_UPDATE, d
    assert d["grad_excess"] > 1.0, d


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_gradient_sync_per_step_with_accumulation(request, world, kind):
    """no_sync on all but the last re-forward: accumulating adds no DDP all-reduce."""
    results = request.getfixturevalue(f"world{world}")
    plain, accum = results[f"{kind}-accum1"], results[f"{kind}-accum2"]
    assert plain["reductions_per_step"] >= 1
    assert accum["reductions_per_step"] == plain["reductions_per_step"]


def test_checkpoint_roundtrip_world1(tmp_path, init_states):
    out = checkpoint_roundtrip(0, 1, init_states["clip"], str(tmp_path))
    _check_roundtrip(out, tmp_path)


def test_checkpoint_roundtrip_world2(world2):
    _check_roundtrip(world2["checkpoint"], None)


def _check_roundtrip(out: dict, folder) -> None:
    assert out["files"] == ["extra.pt", "model.pt", "optimizer.pt", "scheduler.pt"]
    assert out["extra"] == {"step": 2, "note": "hello"}
    for name, v in out["straight"].items():
        np.testing.assert_array_equal(out["resumed"][name], v, err_msg=name)
    if folder is not None:
        saved = torch.load(folder / "model.pt", weights_only=True)
        assert set(saved) == set(out["straight"])  # plain open_clip keys, no "module."


def test_checkpoint_errors(tmp_path):
    engine = make_engine(make_model(), 0, 1, "clip", 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.save_checkpoint(tmp_path / "missing", {})
    engine.save_checkpoint(tmp_path, {"step": 0})
    (tmp_path / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        engine.load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- RNG replay

ACCUM, SEED = 4, 7


def _rng_batch(model):
    b = make_batch(0, 0, 1, model)
    return b.images, b.texts


def _reference_grads(model) -> tuple[dict, torch.Tensor]:
    """One graph over the full batch, micro-batch i encoded under the RNG state the cache records."""
    images, texts = _rng_batch(model)
    torch.manual_seed(SEED)
    feats = [encode(model, im, tx) for im, tx in zip(images.chunk(ACCUM), texts.chunk(ACCUM))]
    loss = ClipLoss()(torch.cat([f.image for f in feats]), torch.cat([f.text for f in feats]), feats[0].scale)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, torch.get_rng_state()


def _gradcache_grads(model) -> tuple[dict, torch.Tensor]:
    images, texts = _rng_batch(model)
    torch.manual_seed(SEED)
    cached_forward_backward(model, ClipLoss(), images, texts, ForwardOptions(torch.device("cpu"), accum_steps=ACCUM))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, torch.get_rng_state()


def _grad_rel(a: dict, b: dict) -> float:
    fa = torch.cat([v.flatten() for v in a.values()])
    fb = torch.cat([v.flatten() for v in b.values()])
    return float((fa - fb).norm() / fb.norm())


@pytest.fixture(scope="module")
def dropout_model():
    return make_model("clip", patch_dropout=0.5)


def test_patch_dropout_is_really_on(dropout_model):
    images, texts = _rng_batch(dropout_model)
    with torch.no_grad():
        torch.manual_seed(1)
        a = encode(dropout_model, images, texts).image
        torch.manual_seed(2)
        b = encode(dropout_model, images, texts).image
    assert (a - b).abs().max() > 1e-3


def test_gradcache_replays_rng(dropout_model):
    ref, ref_rng = _reference_grads(dropout_model)
    got, got_rng = _gradcache_grads(dropout_model)
    assert _grad_rel(got, ref) < 1e-5
    # The stream continues as if each micro-batch had been drawn once.
    assert torch.equal(got_rng, ref_rng)


def test_gradcache_without_replay_is_detected(dropout_model, monkeypatch):
    ref, _ = _reference_grads(dropout_model)
    monkeypatch.setattr(train.objective.feature_cache, "restore_device", lambda state, device: None)
    got, _ = _gradcache_grads(dropout_model)
    assert _grad_rel(got, ref) > 1e-2


# ----------------------------------------------------------------------------- engine API


def test_step_metrics_lr_and_logit_scale_clamp():
    model = make_model()
    engine = make_engine(model, 0, 1, "clip", 2)
    assert isinstance(engine, Engine) and engine.model is model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    lr_before = engine.optimizer.param_groups[0]["lr"]
    out = engine.step(make_batch(0, 0, 1, model))
    assert set(out) == {"loss", "logit_scale", "grad_norm", "lr", "finite"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.values())
    assert float(out["lr"]) == pytest.approx(lr_before)  # the lr this step used
    assert engine.optimizer.param_groups[0]["lr"] > lr_before  # the scheduler stepped (warm-up)
    assert float(out["logit_scale"]) == pytest.approx(200.0, rel=1e-5)  # the scale this step used
    assert float(model.logit_scale.detach()) <= math.log(100.0) + 1e-7  # clamped after the step
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def bf16_reference(init_states) -> dict:
    """The full batch on one process in bf16 autocast, and (world 1, accum 4) in bf16."""
    return {(k, a): train_case(0, 1, init_states[k], k, a, precision="bf16") for k in KINDS for a in (1, 4)}


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_cuts_of_the_batch_agree_to_the_stated_tolerance(world2, bf16_reference, init_states, kind):
    """bf16 autocast: (world 2, accum 2) and (world 1, accum 4) vs the full batch, within
    ``TOLERANCE["bf16"]`` (the towers round each micro-batch's matmuls differently; the loss
    is fp32). Ranks still agree bit for bit."""
    ref = bf16_reference[(kind, 1)]
    for res in (world2[f"{kind}-accum2-bf16"], bf16_reference[(kind, 4)]):
        d = distances(res, ref, init_states[kind])
        assert d["params"] <= TOLERANCE["bf16"]["params"], d
        assert d["loss"] <= TOLERANCE["bf16"]["loss"], d
        assert d["params"] > 0, d  # bf16 really ran: fp32 cuts agree to ~2e-7, not exactly
        assert res.get("rank_disagreement", 0.0) == 0.0
    print(kind, {k: f"{v:.2e}" for k, v in distances(world2[f"{kind}-accum2-bf16"], ref, init_states[kind]).items()})


def test_bf16_autocast_step_matches_fp32_roughly(init_states):
    def first_loss(precision: str) -> float:
        model = make_model()
        model.load_state_dict({k: torch.as_tensor(v) for k, v in init_states["clip"].items()})
        engine = make_engine(model, 0, 1, "clip", 2, precision=precision)
        return float(engine.step(make_batch(0, 0, 1, model))["loss"])

    bf16, fp32 = first_loss("bf16"), first_loss("fp32")
    assert math.isfinite(bf16) and bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=5e-2)


def test_autocast_choice(cpu_bf16):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == cpu_bf16
    assert (autocast_factory("auto", cpu) is contextlib.nullcontext) == (cpu_bf16 == "fp32")
    assert "forced by ORBITCLIP_CPU_BF16" in choose_precision("auto", cpu)[1]
    assert choose_precision("fp32", cpu) == ("fp32", "train.precision=fp32")
    assert choose_precision("bf16", cpu) == ("bf16", "train.precision=bf16")
    assert choose_precision("auto", cuda) == ("bf16", "auto on CUDA")  # whatever the CPU
    assert autocast_factory("fp32", cuda) is contextlib.nullcontext
    assert autocast_factory("auto", cuda) is not contextlib.nullcontext
    with pytest.raises(ValueError, match="precision"):
        autocast_factory("fp16", cpu)


def test_cpu_bf16_detection_reads_the_cpu_unless_told(monkeypatch):
    """Unset, the answer is the CPU's own (its flags as the kernel lists them); a bad value is an error."""
    monkeypatch.delenv("ORBITCLIP_CPU_BF16")
    flags = set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert cpu_has_fast_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})
    assert "forced" not in choose_precision("auto", torch.device("cpu"))[1]
    monkeypatch.setenv("ORBITCLIP_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="ORBITCLIP_CPU_BF16 must be 0 or 1"):
        resolve_precision("auto", torch.device("cpu"))


def test_build_engine_registry_and_errors(monkeypatch):
    cfg, model = Config(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = EngineParts.from_config(cfg, model, opt, None, DistEnv(), "cpu")
    assert isinstance(build_engine("ddp", parts), DDPEngine)

    sentinel = object()
    monkeypatch.setitem(train.engines.base._ENGINES, "fake", lambda *a: sentinel)
    assert build_engine("fake", parts) is sentinel
    with pytest.raises(RuntimeError, match="'nope' is not available"):
        build_engine("nope", parts)
    assert register_engine("x")(len) is len  # decorator returns the factory unchanged
    train.engines.base._ENGINES.pop("x")


def test_ddp_engine_needs_a_process_group():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="process group of 2 ranks"):
        DDPEngine(EngineParts.from_config(Config(), model, opt, None, DistEnv(rank=0, world_size=2), "cpu"))


def test_uneven_micro_batches_are_an_error():
    model = make_model()
    engine = make_engine(model, 0, 1, "clip", 3)  # GLOBAL_BATCH=8 is not divisible by 3
    assert GLOBAL_BATCH % 3
    with pytest.raises(ValueError, match="equal micro-batches"):
        engine.step(make_batch(0, 0, 1, model))


def test_grad_norm_without_clipping_matches_clipped_runs_prenorm(reference, init_states):
    """The unclipped path reports the same (pre-clip) norm as the clipped reference."""
    model = make_model()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in init_states["clip"].items()})
    engine = make_engine(model, 0, 1, "clip", 1)
    engine.clip_grad_norm = None
    out = engine.step(make_batch(0, 0, 1, model))
    assert float(out["grad_norm"]) == pytest.approx(reference[("clip", 1)]["grad_norm"][0], rel=1e-6)


def test_custom_backward_hook_sees_every_backward():
    """Engines that must own backward (DeepSpeed) get the same cotangents through the hook."""
    model = make_model()
    images, texts = _rng_batch(model)
    calls = []

    def doubled(tensors, grads):
        calls.append(len(tensors))
        torch.autograd.backward(tensors, [2 * g for g in grads])

    grads = {}
    for name, hook in (("default", None), ("doubled", doubled)):
        kw = {} if hook is None else {"backward": hook}
        cached_forward_backward(model, ClipLoss(), images, texts, ForwardOptions(torch.device("cpu"), accum_steps=2, **kw))
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    assert calls == [2, 3]  # micro 0: image+text; last micro also the logit scale
    assert _grad_rel({k: v / 2 for k, v in grads["doubled"].items()}, grads["default"]) < 1e-6


def test_accumulation_over_batchnorm_is_refused_unless_frozen():
    """Micro-batch statistics are not the full batch's: refuse, naming the layer and the way out."""
    from train.core.configbase import ConfigError

    class BNTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    cfg = Config()
    cfg.train.accum_steps = 2
    model = BNTower()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"BatchNorm in training mode \(visual.1\).*lock_image_freeze_bn_stats"):
        build_engine("ddp", EngineParts.from_config(cfg, model, opt, None, DistEnv(), "cpu"))
    cfg.train.accum_steps = 1  # no feature cache: the batch is the batch
    assert isinstance(build_engine("ddp", EngineParts.from_config(cfg, model, opt, None, DistEnv(), "cpu")), DDPEngine)
    model.visual[1].eval()  # frozen statistics (what lock_image_freeze_bn_stats does)
    cfg.train.accum_steps = 2
    assert isinstance(build_engine("ddp", EngineParts.from_config(cfg, model, opt, None, DistEnv(), "cpu")), DDPEngine)
