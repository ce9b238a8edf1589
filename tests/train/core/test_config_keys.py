"""No dead config key: every field of the config dataclasses is read by the code that runs.

Each section instance of a loaded config is switched to a subclass that records which
fields are read (reads by the config machinery itself — ``to_dict`` for config.yaml and
checkpoints, ``dataclasses`` — do not count). Then the product runs the way users run it:
a training run on synthetic scenes with evaluation, one on local shards with a worker
process, one on the same shards over HTTP, one whose shards are missing, and the DeepSpeed
configuration. A field nobody reads would be a documented switch that
silently does nothing.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.train.data.test_remote_shards import ShardServer
from tests.train.test_trainer import micro_cfg
from train.core.config import Config, ShardSourceConfig
from train.core.distenv import DistEnv
from train.core.errors import UserError

_IGNORED_CALLERS = ("configbase.py", "dataclasses.py", "copy.py", "reprlib.py", "pprint.py")


def leaf_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of every field of a config dataclass (list items as ``[]``)."""
    out = set()
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out |= leaf_keys(type(default), name + ".")
        elif f.name == "shards":
            out |= leaf_keys(ShardSourceConfig, name + "[].")
        else:
            out.add(name)
    return out


def track(obj: Any, prefix: str, reads: set[str]) -> None:
    """Make ``obj`` (and nested sections) record field reads into ``reads``, in place."""
    names = {f.name for f in dataclasses.fields(obj)}
    base = type(obj)

    def getattribute(self: Any, attr: str) -> Any:
        if attr in names:
            caller = Path(sys._getframe(1).f_code.co_filename).name
            if caller not in _IGNORED_CALLERS:
                reads.add(prefix + attr)
        return base.__getattribute__(self, attr)

    tracked = type(f"Tracked{base.__name__}", (base,), {"__getattribute__": getattribute})
    for f in dataclasses.fields(obj):
        value = object.__getattribute__(obj, f.name)
        if dataclasses.is_dataclass(value):
            track(value, f"{prefix}{f.name}.", reads)
        elif f.name == "shards":
            for item in value:
                track(item, f"{prefix}{f.name}[].", reads)
    obj.__class__ = tracked


def test_leaf_keys_cover_the_schema():
    keys = leaf_keys(Config)
    assert {"eval.batch_size", "train.compile", "data.augment.hflip", "data.shards[].weight"} <= keys


def test_every_config_key_is_read(tmp_path):
    from shards.api import build as build_shards
    from train.engines.deepspeed.config import build_ds_config
    from train.trainer import run

    reads: set[str] = set()
    # 1) synthetic scenes, accumulation, evaluation at the end.
    cfg = micro_cfg(tmp_path / "syn", "train.steps=2", "train.accum_steps=2", "eval.benchmarks=[demo]")
    track(cfg, "", reads)
    run(cfg, DistEnv())
    # 2) shards with a worker process, length in epochs, a LiT-locked image tower.
    shards = tmp_path / "shards"
    build_shards("synthetic", None, str(shards), count=64, image_size=32, shard_size=16, progress=False, workers=1)
    cfg = micro_cfg(tmp_path / "wds", "train.steps=null", "train.epochs=0.25", "data.source=shards",
                    "data.workers=1", f"data.shards=[{{path: {shards}}}]", "model.lock_image=true")
    track(cfg, "", reads)
    run(cfg, DistEnv())
    # 3) the same shards over HTTP, as a brace pattern with its sizes.json named; every tar
    #    answers 503 once (the open is retried).
    server = ShardServer(shards)
    server.unavailable = {p.name: 1 for p in (shards / "train").glob("*.tar")}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/train"
        n = len(list((shards / "train").glob("*.tar")))
        url = f"{base}/train-{{000000..{n - 1:06d}}}.tar"
        cfg = micro_cfg(tmp_path / "http", "train.steps=2", "data.source=shards", "data.workers=0",
                        f"data.shards=[{{path: '{url}', sizes: '{base}/sizes.json'}}]", "data.remote.retry_wait=0.01")
        track(cfg, "", reads)
        run(cfg, DistEnv())
    finally:
        server.shutdown()
        server.server_close()
    # 4) shards that are not there yet: the error names the command that builds them.
    cfg = micro_cfg(tmp_path / "missing", "train.steps=2", "data.source=shards",
                    f"data.shards=[{{path: {tmp_path / 'nowhere'}, build: 'python -m shards build ...'}}]")
    track(cfg, "", reads)
    with pytest.raises(UserError, match="python -m shards build"):
        run(cfg, DistEnv())
    # 5) the DeepSpeed engine's configuration.
    cfg = micro_cfg(tmp_path / "ds", "train.engine=deepspeed", "train.steps=2")
    track(cfg, "", reads)
    build_ds_config(cfg.deepspeed, cfg.data.batch_size, cfg.optim.clip_grad_norm, False, 1)
    assert sorted(leaf_keys(Config) - reads) == []


def test_the_tracker_sees_an_unread_key():
    reads: set[str] = set()
    cfg = Config()
    track(cfg, "", reads)
    _ = cfg.train.steps, cfg.data.augment.hflip
    assert reads == {"train", "train.steps", "data", "data.augment", "data.augment.hflip"}
    assert "eval.batch_size" in leaf_keys(Config) - reads
