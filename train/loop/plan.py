"""The memory planner: one real optimizer step counted under fake tensors, before a job runs.

``python -m train plan --config FILE [overrides] [--memory 80GiB]`` and the trainer's start
line both come from :func:`plan_step`. It builds the run's model, optimizer, scheduler, loss
and engine exactly as the trainer does, turns the parameters into fake tensors
(``FakeTensorMode``: shapes, dtypes and devices, no storage, no compute) and calls the
engine's own ``step`` on a fake batch of the loader's layout. A dispatch mode sees every
storage the step creates and frees, so the peak is counted from the code that will run,
not from a formula beside it, and each phase the engines mark (forward, loss, backward,
optimizer) gets its own peak.

Two things cannot run over fake tensors and are stated as such in the plan: DDP's wrapper
(world > 1 adds its gradient buckets, one copy of the trainable parameters) and the
collectives, which a :class:`PlanComm` replaces by shape-true stand-ins for ``world`` ranks.

Large accumulation counts: with a fixed micro-batch, the step's peak is affine in
``accum_steps`` once the contrastive batch spans two loss blocks (the features, their
gradients and the batch grow with it; activations, parameters, optimizer state and the loss's
blocks do not — at one block the loss holds fewer blocks, so the line starts at two). Beyond
:data:`COUNT_UP_TO` micro-batches the planner counts two such steps and extrapolates, and says
so; ``tests/train/loop/test_plan.py`` checks the extrapolation against a counted step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from train.core import collectives
from train.core.collectives import Comm
from train.core.config import Config
from train.core.configbase import ConfigError
from train.core.distenv import DistEnv
from train.core.phases import listening
from train.core.rng import capture_process, restore_process, seed_everything
from train.data import batches_held, working_bytes
from train.data.batch import Batch
from train.engines import EngineParts, build_engine
from train.model import build_model
from train.optim import build_optimizer, build_scheduler

COUNT_UP_TO = 16
"""Micro-batches per step counted directly; more are extrapolated from two counted steps."""

GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages per device, their running peak, and the peak per phase."""

    def __init__(self) -> None:
        super().__init__()
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.phase_peak: dict[str, int] = {}
        self._phases: list[str] = []
        self._refs: dict[int, weakref.ref] = {}

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage once while it lives (views share it)."""
        st = t.untyped_storage()
        key = id(st)
        ref = self._refs.get(key)
        if ref is not None and ref() is st:
            return
        dev, n = str(t.device), st.nbytes()
        self.now[dev] = self.now.get(dev, 0) + n
        self.peak[dev] = max(self.peak.get(dev, 0), self.now[dev])
        for name in self._phases:
            self.phase_peak[name] = max(self.phase_peak.get(name, 0), self.total())

        def freed(_: Any, key: int = key, dev: str = dev, n: int = n) -> None:
            self.now[dev] -= n
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(st, freed)

    def total(self) -> int:
        return sum(self.now.values())

    def reset_peak(self) -> None:
        self.peak = dict(self.now)
        self.phase_peak = {}

    def listener(self, name: str, starting: bool) -> None:
        """A :func:`train.core.phases.listening` listener: peaks per phase."""
        if starting:
            self._phases.append(name)
            self.phase_peak[name] = max(self.phase_peak.get(name, 0), self.total())
        elif name in self._phases:
            self._phases.remove(name)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class PlanComm(Comm):
    """Collectives of ``world`` ranks in one process, true in shape (values are fake anyway)."""

    simulated = True

    def __init__(self, world: int, compute: torch.device) -> None:
        super().__init__(DistEnv(), compute)
        self._world = world

    @property
    def world(self) -> int:
        return self._world

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t.detach().clone()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.detach()] * self._world)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()[: t.shape[0] // self._world].clone()


@dataclass
class MemoryPlan:
    """The predicted memory of one optimizer step of one rank (bytes)."""

    device: str
    """Where the step was counted (``cpu`` or ``cuda``)."""
    world: int
    batch_per_rank: int
    accum_steps: int
    state: int
    """Parameters and buffers before the first step."""
    step_peak: int
    """Peak of everything the step holds on the compute device (not the batch)."""
    after_step: int
    """Live after the step: parameters and optimizer state."""
    phase_peaks: dict[str, int]
    batch_bytes: int
    """One batch as the loader hands it over (host memory)."""
    batches_held: int
    """Batches the loader holds at once (workers x prefetch + the one in use [+ a pinned copy])."""
    loader_bytes: int = 0
    """The loader's own working memory (the synthetic source's scene cache)."""
    ddp_buckets: int = 0
    """World > 1: DDP's gradient buckets (not countable over fake tensors; one copy of the trainable parameters)."""
    extrapolated_from: tuple[int, int] | None = None
    """The two counted accumulation counts, when ``accum_steps`` was extrapolated."""
    notes: list[str] = field(default_factory=list)

    @property
    def effective_batch(self) -> int:
        return self.batch_per_rank * self.world

    @property
    def device_peak(self) -> int:
        """Peak device memory of the step, per rank (the batch is host memory, not in it)."""
        return self.step_peak + self.ddp_buckets

    @property
    def host_peak(self) -> int:
        """Host memory of the loader: its batches and its cache (on CPU also the step's, see
        :attr:`total_cpu`)."""
        return self.batch_bytes * self.batches_held + self.loader_bytes

    @property
    def total_cpu(self) -> int:
        """On a CPU run device and host are one memory: the step's peak plus the batches held."""
        return self.device_peak + self.host_peak

    def lines(self) -> list[str]:
        """Human-readable lines (the CLI and the trainer's start log)."""
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        how = (f"extrapolated from counted steps at accum {self.extrapolated_from[0]} and {self.extrapolated_from[1]}"
               if self.extrapolated_from else "counted")
        phases = ", ".join(f"{k} {g(v)}" for k, v in self.phase_peaks.items())
        out = [
            f"memory plan ({how} on {self.device}): effective batch {self.effective_batch:,} = "
            f"{self.world} rank(s) x {self.batch_per_rank:,} (accum {self.accum_steps} x "
            f"{self.batch_per_rank // self.accum_steps:,})",
            f"  device peak per rank {g(self.device_peak)}: parameters+buffers {g(self.state)}, after the step "
            f"(+ optimizer state) {g(self.after_step)}" + (f", DDP buckets {g(self.ddp_buckets)}" if self.ddp_buckets else ""),
            f"  peak by phase: {phases}",
            f"  host: {self.batches_held} uint8 batch(es) of {g(self.batch_bytes)} held by the loader"
            + (f" + its cache {g(self.loader_bytes)}" if self.loader_bytes else "") + f" = {g(self.host_peak)}",
        ]
        if self.device == "cpu":
            out.append(f"  one memory on CPU: {g(self.total_cpu)} in all")
        return out + [f"  note: {n}" for n in self.notes]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(device_peak=self.device_peak, host_peak=self.host_peak, effective_batch=self.effective_batch)
        if self.device == "cpu":
            d["total_cpu"] = self.total_cpu
        return d


def parse_bytes(text: str) -> int:
    """``80GiB``, ``24 GB``, ``512MiB``, ``1.5T`` -> bytes (binary units for G/GiB alike).

    Raises:
        ConfigError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"not a memory size: {text!r} (e.g. 80GiB, 512MiB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def plan_device(cfg: Config) -> torch.device:
    """Where the step is counted: CUDA when the run would use it and this torch has it, else CPU."""
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if want_cuda and torch.cuda.is_available() else "cpu")


def plan_step(cfg: Config, world: int = 1, device: torch.device | None = None) -> MemoryPlan:
    """Predict one optimizer step's memory for ``cfg`` at ``world`` ranks (see the module docstring).

    The process's RNG streams and installed :class:`Comm` are left as they were.

    Raises:
        ConfigError: an engine the planner cannot count (DeepSpeed), or what the engine refuses.
    """
    if cfg.train.engine != "ddp":
        raise ConfigError(f"the memory planner counts train.engine=ddp only (got {cfg.train.engine}: "
                          "DeepSpeed's partitioned state cannot be built over fake tensors)")
    k, micro = cfg.train.accum_steps, cfg.data.batch_size // max(1, cfg.train.accum_steps)
    block = max(1, cfg.loss.block_size)
    # Two counted steps whose contrastive batch spans two loss blocks or more: from there on
    # the loss holds the same blocks at its peak, whatever the batch.
    k1 = max(2, math.ceil(2 * block / max(1, micro * world)))
    k2 = 2 * k1
    if k <= max(COUNT_UP_TO, k2):
        return _count(cfg, world, device)
    a, b = (_count(_with_accum(cfg, kk, micro), world, device) for kk in (k1, k2))
    ext = lambda x, y: x + (y - x) * (k - k1) // (k2 - k1)  # noqa: E731
    notes = list(b.notes)
    return dataclasses.replace(
        b, batch_per_rank=cfg.data.batch_size, accum_steps=k, step_peak=ext(a.step_peak, b.step_peak),
        after_step=ext(a.after_step, b.after_step),
        phase_peaks={p: ext(a.phase_peaks.get(p, 0), v) for p, v in b.phase_peaks.items()},
        batch_bytes=ext(a.batch_bytes, b.batch_bytes), extrapolated_from=(k1, k2), notes=notes)


def largest_batch(cfg: Config, memory: int, world: int = 1, device: torch.device | None = None) -> MemoryPlan | None:
    """The plan of the largest ``accum_steps`` (same micro-batch) whose step fits ``memory``
    bytes per rank (device peak; on CPU everything, batches included), or None if none does."""
    micro = cfg.data.batch_size // cfg.train.accum_steps
    on_cpu = (torch.device(device) if device is not None else plan_device(cfg)).type == "cpu"
    need = (lambda p: p.total_cpu) if on_cpu else (lambda p: p.device_peak)  # noqa: E731
    one, two = (plan_step(_with_accum(cfg, kk, micro), world, device) for kk in (1, 2))
    if need(one) > memory:
        return None
    slope = max(1, need(two) - need(one))
    k = max(1, 1 + (memory - need(one)) // slope)
    while True:  # the affine guess, checked with the planner itself and walked down if over
        plan = plan_step(_with_accum(cfg, k, micro), world, device)
        if need(plan) <= memory or k == 1:
            return plan if need(plan) <= memory else None
        k = max(1, min(k - 1, int(k * memory / need(plan))))


def _with_accum(cfg: Config, k: int, micro: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, accum_steps=k),
                               data=dataclasses.replace(cfg.data, batch_size=micro * k))


_counted: dict[tuple[str, int, str], MemoryPlan] = {}
"""Counted steps of this process, by config (the run folder aside), world and device: a sweep
or :func:`largest_batch` extrapolating from the same two steps counts them once."""


def _count(cfg: Config, world: int, device: torch.device | None) -> MemoryPlan:
    device = torch.device(device) if device is not None else plan_device(cfg)
    key = (repr(dataclasses.replace(cfg, run=type(cfg.run)())), world, str(device))
    if key not in _counted:
        _counted[key] = _count_once(cfg, world, device)
    return dataclasses.replace(_counted[key], notes=list(_counted[key].notes))


def _count_once(cfg: Config, world: int, device: torch.device) -> MemoryPlan:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg, notes = _countable(cfg)
    if cfg.train.device == "cuda" and device.type == "cpu":
        notes.append("counted on CPU (this torch has no CUDA): CUDA kernels (flash attention) may use less")
    rng = capture_process()
    try:
        seed_everything(cfg.train.seed)
        bundle = build_model(cfg.model)  # real weights on the host, then swapped for fake ones
        context = int(bundle.tokenizer(["x"]).shape[1])
        size = bundle.image_size if isinstance(bundle.image_size, int) else bundle.image_size[0]
        fake, counter = FakeTensorMode(), LiveBytes()
        _fake_parameters(bundle.model, fake, device)
        with fake, counter, _installed(PlanComm(world, device)):
            for t in [*bundle.model.parameters(), *bundle.model.buffers()]:
                counter.track(t)
            state = counter.total()
            optimizer = build_optimizer(bundle.model, cfg.optim)
            scheduler = build_scheduler(optimizer, cfg.optim, max(1, cfg.train.steps or 1))
            parts = EngineParts.from_config(cfg, bundle.model, optimizer, scheduler, DistEnv(), device,
                                            comm=collectives.current())
            engine = build_engine("ddp", parts)
            batch = Batch.empty(cfg.data.batch_size, size, context)
            counter.reset_peak()
            with listening(counter.listener):
                engine.step(batch)
            # The batch is host memory; on CPU it shares the device's counter, so take it out.
            batch_bytes = _bytes(batch)
            on_device = batch_bytes if device.type == "cpu" else 0
            step_peak, after = max(counter.peak.values()) - on_device, counter.total() - batch_bytes
    finally:
        restore_process(rng)
    trainable = sum(p.numel() * p.element_size() for p in bundle.model.parameters() if p.requires_grad)
    loader_bytes, uncounted = working_bytes(cfg.data, size)
    if uncounted:
        notes.append(f"host: {uncounted}")
    return MemoryPlan(
        device=device.type, world=world, batch_per_rank=cfg.data.batch_size, accum_steps=cfg.train.accum_steps,
        state=state, step_peak=step_peak, after_step=after,
        phase_peaks={k: v - on_device for k, v in counter.phase_peak.items()},
        batch_bytes=batch_bytes, batches_held=batches_held(cfg.data, cuda=device.type == "cuda"),
        loader_bytes=loader_bytes, ddp_buckets=trainable if world > 1 else 0, notes=notes)


def _countable(cfg: Config) -> tuple[Config, list[str]]:
    """The config as the fake step can run it, and what was changed for it."""
    notes, model, train = [], cfg.model, cfg.train
    weights = model.pretrained
    if weights and not weights.startswith(("local-dir:", "hf:")):
        # A tag, a checkpoint file or a run of ours: the architecture is model.name, and
        # the weights' values do not change memory (nor need a download to plan).
        model = dataclasses.replace(model, pretrained=None)
        notes.append(f"counted with random weights of {model.name} (model.pretrained={weights} not loaded)")
    if train.unique_texts:
        # Which captions repeat is data; counting every caption is the upper bound.
        train = dataclasses.replace(train, unique_texts=False)
        notes.append("counted without train.unique_texts (an upper bound: repeated captions are encoded once)")
    return dataclasses.replace(cfg, model=model, train=train), notes


def _bytes(batch: Batch) -> int:
    return sum(t.untyped_storage().nbytes() for t in (batch.images, batch.texts))


def _fake_parameters(model: nn.Module, fake: Any, device: torch.device) -> None:
    """Replace every parameter and buffer by a fake one on ``device`` (shared ones stay shared)."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        f = fake.from_tensor(t.detach())
        if f.device != device:
            with fake:
                f = f.to(device)
        return f

    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(convert(p), p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = convert(b)


@contextlib.contextmanager
def _installed(comm: Comm) -> Iterator[Comm]:
    before = collectives.install(comm)
    try:
        yield comm
    finally:
        collectives.install(before)


AUTO_CPU_BATCH = 4096
"""``train.memory_check=auto`` on CPU: checked from this batch per rank up (smaller CPU runs
are never the risk, and the fake step costs seconds)."""


def available_host_bytes() -> int:
    """What the machine can still give (``MemAvailable``), or a large number where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def available_device_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, or the host's for CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_bytes()


def should_check(mode: str, cfg: Config, device: torch.device) -> bool:
    """Whether ``train.memory_check`` asks for a plan at the start of this run."""
    if mode not in ("auto", "always", "never"):
        raise ConfigError(f"train.memory_check must be auto, always or never, got {mode!r}")
    if mode == "never" or cfg.train.engine != "ddp":
        return False
    return mode == "always" or device.type == "cuda" or cfg.data.batch_size >= AUTO_CPU_BATCH


def check_fits(plan: MemoryPlan, local_ranks: int, device: torch.device) -> None:
    """Refuse, with one line, a step that cannot fit this machine (``local_ranks`` share the host).

    Raises:
        ConfigError: naming what does not fit, by how much, and the ways out.
    """
    g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    way_out = "lower data.batch_size (or raise train.accum_steps for the same batch), or train.memory_check=never"
    host = available_host_bytes()
    if device.type == "cpu":
        need = plan.total_cpu * local_ranks
        if need > host:
            raise ConfigError(f"this run needs about {g(need)} of memory ({local_ranks} rank(s) x {g(plan.total_cpu)}: "
                              f"step {g(plan.device_peak)}, loader batches {g(plan.host_peak)}); {g(host)} available: "
                              + way_out)
        return
    free = available_device_bytes(device)
    if plan.device_peak > free:
        raise ConfigError(f"one step needs about {g(plan.device_peak)} on {device}, {g(free)} free: " + way_out)
    if plan.host_peak * local_ranks > host:
        raise ConfigError(f"the loaders' batches need about {g(plan.host_peak * local_ranks)} of host memory, "
                          f"{g(host)} available: " + way_out + ", or fewer data.workers / data.prefetch_factor")
