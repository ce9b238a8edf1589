"""Config machinery, DistEnv and the torchvision compat shim."""

from __future__ import annotations

import pytest

from train.core.config import load_config, save_config
from train.core.configbase import ConfigError
from train.core.distenv import DistEnv, dist_env_from, first_host


def test_overrides_are_typed_and_unknown_keys_named(tmp_path):
    cfg = load_config(None, ["train.steps=5", "data.source=synthetic", "optim.lr=1e-4", "optim.betas=[0.9,0.95]"])
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(None, ["train.steps=5", "data.source=synthetic", "optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many", "data.source=synthetic"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["train.steps=5", "data.source=synthetic", "loss.kind=triplet"])


def test_base_file_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 100}\ndata: {source: synthetic, batch_size: 32}\n")
    (tmp_path / "tiny.yaml").write_text("base: base.yaml\ndata: {batch_size: 8}\n")
    cfg = load_config(tmp_path / "tiny.yaml")
    assert (cfg.train.steps, cfg.data.batch_size, cfg.data.source) == (100, 8, "synthetic")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="accum_steps"):
        load_config(None, ["train.steps=5", "data.source=synthetic", "data.batch_size=10", "train.accum_steps=3"])
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(None, ["train.steps=5"])


def test_dist_env_single_torchrun_slurm():
    assert dist_env_from({}) == DistEnv()
    tr = dist_env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.launcher) == (
        3, 8, 1, "n1", 1234, "torchrun")
    sl = dist_env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.local_world_size, sl.master_addr) == (5, 8, 1, 4, "gpu07")
    assert sl.launcher == "slurm" and 20000 <= sl.master_port < 40000


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("gpu[03-05,7]", "gpu03"),
                                           ("a[1,3],b2", "a1"), ("x-y[010-012]", "x-y010")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_torchvision_imports_after_compat():
    import train.core.compat

    train.core.compat.ensure_torchvision()
    import open_clip  # noqa: F401  (imports torchvision)
    import torchvision.transforms.v2  # noqa: F401

    assert train.core.compat.ensure_torchvision() in (True, False)  # idempotent
