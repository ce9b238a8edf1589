"""The trainer's configuration schema: typed dataclasses, one per section.

Load with :func:`load_config` (YAML + ``section.key=value`` overrides); unknown
keys are rejected with the key named. The resolved config is written to
``<run_dir>/config.yaml`` when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from train.core.configbase import ConfigError, dump_yaml, load


@dataclass
class ModelConfig:
    """Which CLIP to build and how to train it."""

    name: str = "orbit-tiny"
    """open_clip architecture name; our tiny ones are registered from configs/models/*.json."""
    pretrained: str | None = None
    """Weights: an open_clip pretrained tag ("openai"), a checkpoint file, ``local-dir:DIR``
    (open_clip_config.json + open_clip_model.safetensors), ``hf:DIR`` (transformers CLIPModel
    folder, converted), or a run directory of ours. None = random init."""
    lock_image: bool = False
    """LiT: freeze the image tower."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: how many last layer groups stay trainable."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image: also freeze BatchNorm running stats (ResNet/timm towers; no-op for ViTs)."""
    lock_text: bool = False
    """Freeze the text tower."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: how many last layers stay trainable."""
    freeze_token_embedding: bool = False
    """Keep the token embedding (49408 x width, most of a tiny CLIP's parameters) fixed. From
    scratch on template captions only a few dozen rows are ever used, yet AdamW and the
    gradient all-reduce touch all of them every step; random fixed rows are still distinct
    inputs for the text transformer."""
    patch_dropout: float = 0.0
    """FLIP: fraction of image patches dropped during training (0 = off)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    image_size: int | None = None
    """Override the architecture's input size (None = as configured)."""
    init_logit_scale: float | None = None
    """Override the initial logit scale (as a log value); None = architecture default."""
    init_logit_bias: float | None = None
    """Initial logit bias; required by the SigLIP loss (open_clip uses -10)."""


@dataclass
class ShardSourceConfig:
    """One stream of training shards; several are mixed by weight."""

    path: str = ""
    """A shards output folder (uses its ``<split>/`` tars and sizes.json), a brace pattern
    ``dir/{000000..000009}.tar``, or an img2dataset output folder. Each may be a local path
    or a URL: ``http(s)://`` (read with a timeout, see ``data.remote``), or ``s3://``,
    ``gs://`` and other fsspec URLs (needs fsspec's backend package, e.g. s3fs or gcsfs).
    ``pipe:CMD`` (e.g. ``pipe:curl -fsSL https://host/train-{000000..000009}.tar``) reads
    each tar from CMD's stdout; its sample counts come from ``sizes``."""
    split: str = "train"
    """Which split folder to read when ``path`` is a shards output folder."""
    weight: float = 1.0
    """Relative sampling weight when mixing sources."""
    sizes: str | None = None
    """A sizes.json (local path or URL: ``{"train-000000.tar": n, ...}``) that gives the
    sample count of each tar of a brace pattern or ``pipe:`` command, by tar file name,
    instead of discovering them next to the tars. ``pipe:`` sources need it for the exact
    per-(rank, worker) split; without it they only run with ``data.resampled=true`` and
    ``data.samples_per_epoch`` (shards drawn uniformly, epochs nominal)."""
    build: str | None = None
    """The command that builds this source; the error for a missing ``path`` shows it."""


@dataclass
class AugmentConfig:
    """Training-time image augmentation for overhead imagery (all off for eval)."""

    enabled: bool = True
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    """Random multiples of 90 degrees: overhead images have no canonical 'up'."""
    color_jitter: float = 0.0
    """Strength of brightness/contrast/saturation jitter (0 = off)."""
    hue_jitter: float = 0.0


@dataclass
class RemoteConfig:
    """How shards and sizes files behind URLs (http(s), fsspec, ``pipe:``) are read."""

    timeout: float = 60.0
    """Seconds to wait for a connection and for each read; a read that stalls longer counts
    as a lost connection (its samples are counted and the shard is left)."""
    retries: int = 4
    """Retries of a failed *open* (refused or reset connection, timeout, HTTP 5xx/408/429, a
    command that fails before its first byte). A stream that has delivered data is never
    re-opened: if it breaks, the samples it did not deliver are counted."""
    retry_wait: float = 1.0
    """Seconds before the first retry; doubled after each."""


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    source: Literal["shards", "synthetic"] = "shards"
    """``shards``: webdataset tars; ``synthetic``: deterministic in-memory procedural scenes
    (sample ``i`` of the global stream is fixed, used by the exactness tests)."""
    shards: list[ShardSourceConfig] = field(default_factory=list)
    batch_size: int = 64
    """Samples per rank per optimizer step (the effective contrastive batch is
    batch_size x world_size; train.accum_steps cuts it into micro-batches)."""
    workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer per worker (0 = no sample shuffle)."""
    resampled: bool = False
    """Sample shards with replacement (for multi-node; epochs become nominal)."""
    samples_per_epoch: int | None = None
    """Override the epoch length; default from sizes.json / img2dataset stats."""
    caption_sampling: Literal["random", "first"] = "random"
    """``random``: a random caption of the sample each time it is seen (CLIP-rsicd)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic_samples: int = 4096
    """Size of the in-memory synthetic dataset (source=synthetic)."""
    synthetic_image_size: int = 64
    prefetch_factor: int = 4
    pin_memory: bool = True
    """Pinned host memory for batches (only used with CUDA)."""
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    """Timeouts and retries for shards read over a network."""


@dataclass
class LossConfig:
    """Contrastive objective; features are always gathered (with grad) across ranks."""

    kind: Literal["clip", "siglip"] = "clip"
    block_size: int = 4096
    """Rows and columns per block of logits in the tiled loss: its memory is about three
    ``block_size^2`` fp32 buffers whatever the batch (4096: 192 MiB). Smaller saves memory,
    larger saves per-block overhead; the result is the same to fp32 rounding."""
    logit_scale_max: float = 100.0
    """The learnable temperature is clamped to at most this scale."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adam", "adafactor"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    """Not applied to biases, norms, embeddings or the logit scale/bias."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    """Alternative to warmup_steps: a fraction of the total steps (the larger wins)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    clip_grad_norm: float | None = None
    foreach: bool | None = None
    """torch's multi-tensor optimizer path (None = torch's default)."""
    fused: bool | None = None
    """Fused Adam/AdamW kernel. None = on unless foreach=true (it is the path that can skip a
    non-finite step on the device); Adafactor has none (true is an error)."""


@dataclass
class TrainConfig:
    """The loop: length, precision, checkpoints, logging."""

    steps: int | None = None
    """Total optimizer steps (or give epochs)."""
    epochs: float | None = None
    """Length in epochs of the (mixed) training data; converted to steps."""
    accum_steps: int = 1
    """Cut each rank's batch into this many micro-batches (feature cache / GradCache)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on GPU and on CPUs with native bf16 (AVX-512 BF16 or AMX),
    fp32 on other CPUs (where bf16 is emulated and about 12x slower)."""
    unique_texts: bool = False
    """Encode each distinct caption of a (micro-)batch once: exact, and nearly frees the
    text tower with template captions; costs one host sync per step on GPU."""
    engine: Literal["ddp", "deepspeed"] = "ddp"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend for world > 1. ``auto``: nccl on CUDA, gloo on CPU. ``gloo`` on
    CUDA runs several ranks on one GPU (NCCL refuses two ranks per device): for rehearsals
    and checks, slower than nccl."""
    log_every: int = 10
    checkpoint_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    resume: str | None = "auto"
    """``auto``: continue from the run directory's latest checkpoint if any; a path; or None."""
    compile: bool = False
    """``torch.compile`` the image and text towers in place (same parameters and checkpoint
    keys; the feature cache's RNG replay stays exact). The first steps pay the compile time."""
    progress: bool = True
    """Progress bar with ETA on rank 0."""
    memory_check: Literal["auto", "always", "never"] = "auto"
    """Count one step's memory before training (the planner, ``python -m train plan``), log it
    and refuse a run that cannot fit the machine. ``auto``: on CUDA, and on CPU from 4,096
    samples per rank (a fake step costs seconds; smaller CPU runs are never the risk)."""
    detect_anomaly_keys: bool = True
    """Stop the run on non-finite steps (see max_nonfinite_steps), naming the step and the
    batch's sample keys; false = only skip and count them."""
    max_nonfinite_steps: int = 1
    """A step whose loss or gradient is NaN/inf is skipped on the device (fused Adam/AdamW)
    and counted; the run stops after this many such steps in a row. Optimizers that cannot
    skip on the device (Adafactor, optim.fused=false) stop at the first one."""
    peer_timeout_s: float = 240.0
    """With several ranks: seconds without a heartbeat from a peer rank (a stopped or lost
    process or node; a slow step still beats) after which every other rank prints one line
    naming the silent ranks and exits 1, instead of waiting in its collective for good.
    Reported at most a tenth later (beats every min(5 s, a tenth)). 0 = no heartbeat."""


@dataclass
class DeepSpeedConfig:
    """Used when train.engine = deepspeed."""

    zero_stage: int = 1
    config: str | None = None
    """A user-given DeepSpeed JSON; checked against our config (conflicts are errors)."""


@dataclass
class EvalConfig:
    """Periodic evaluation through the eval harness (same code as ``python -m eval``)."""

    benchmarks: list[str] = field(default_factory=list)
    """Benchmark names (configs/benchmarks/NAME.yaml) or YAML paths."""
    every: int = 0
    """Steps between evaluations (0 = only at the end)."""
    at_end: bool = True
    batch_size: int = 256


@dataclass
class RunConfig:
    """Where the run lives."""

    name: str = "run"
    root: str = "runs"
    """Run directory = root/name: config.yaml, checkpoints/, tb/, eval/."""

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class Config:
    """Everything a training run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Cross-field checks that a single field's type cannot express."""
        if self.train.steps is None and self.train.epochs is None:
            raise ConfigError("give train.steps or train.epochs")
        if self.data.batch_size % self.train.accum_steps:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"train.accum_steps={self.train.accum_steps}"
            )
        if self.data.source == "shards" and not self.data.shards:
            raise ConfigError("data.source=shards needs at least one entry in data.shards")
        if self.loss.block_size < 1:
            raise ConfigError(f"loss.block_size must be >= 1, got {self.loss.block_size}")
        if self.loss.kind == "siglip" and self.model.init_logit_bias is None:
            raise ConfigError("loss.kind=siglip needs model.init_logit_bias (e.g. -10)")
        r = self.data.remote
        if r.timeout <= 0 or r.retries < 0 or r.retry_wait < 0:
            raise ConfigError(
                f"data.remote needs timeout > 0, retries >= 0 and retry_wait >= 0, got "
                f"timeout={r.timeout}, retries={r.retries}, retry_wait={r.retry_wait}"
            )
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0..3, got {self.deepspeed.zero_stage}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a :class:`Config` from YAML plus dotted overrides (``optim.lr=1e-4``)."""
    return load(Config, path, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    dump_yaml(cfg, path)


__all__ = [
    "AugmentConfig", "Config", "DataConfig", "DeepSpeedConfig", "EvalConfig", "LossConfig", "ModelConfig",
    "OptimConfig", "RemoteConfig", "RunConfig", "ShardSourceConfig", "TrainConfig", "load_config", "save_config",
]
