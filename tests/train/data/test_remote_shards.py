"""Shards behind URLs. A real HTTP server (threaded, in this process, on 127.0.0.1) serves
shards built by ``shards``; it can answer 503 a few times or cut a transfer after N bytes.
Covered: http(s) folder and brace-pattern forms, fsspec (``memory://``), ``pipe:`` commands,
retried opens, dropped connections (counted, training goes on, ranks keep their batches),
exact resume (also across a loss) and one-line CLI errors."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from fnmatch import fnmatch
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from tests import REPO_ROOT
from tests.distutil import free_port
from tests.train.data.test_shard_loader import loader, make_cfg, same_batches, take, write_img2dataset
from train.core.config import RemoteConfig, ShardSourceConfig, load_config
from train.core.configbase import ConfigError
from train.data.shards import storage
from train.data.shards.index import ShardIndexError, discover_source, pipe_shard_name
from train.data.shards.plan import shard_permutation

FAST = RemoteConfig(timeout=20.0, retries=2, retry_wait=0.05)
CUT = 20_000
"""Bytes of a tar sent before a cut transfer closes (a shard of 12 samples is ~51 kB)."""


class ShardServer(ThreadingHTTPServer):
    """Serves a folder over HTTP/1.0; can answer 503 a few times or cut a transfer short."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.hits: Counter = Counter()
        """GET requests per file name."""
        self.unavailable: dict[str, int] = {}
        """File name -> 503 answers still to give."""
        self.cut_rules: list[tuple[str, int, int, float]] = []
        self.cuts_done: Counter = Counter()

    def cut(self, pattern: str, nbytes: int, times: int, stall: float = 0.0) -> None:
        """The first ``times`` GETs of each file matching ``pattern`` close after ``nbytes`` of
        the body (after ``stall`` seconds of silence)."""
        self.cut_rules.append((pattern, nbytes, times, stall))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def plan(self, name: str) -> tuple[bool, tuple[int, float] | None]:
        """(answer 503?, (bytes to send before closing, seconds of silence before)) for a GET of ``name``."""
        with self.lock:
            self.hits[name] += 1
            if self.unavailable.get(name, 0) > 0:
                self.unavailable[name] -= 1
                return True, None
            for pattern, nbytes, times, stall in self.cut_rules:
                if fnmatch(name, pattern) and self.cuts_done[name] < times:
                    self.cuts_done[name] += 1
                    return False, (nbytes, stall)
        return False, None


class _Handler(SimpleHTTPRequestHandler):
    cut_after: tuple[int, float] | None = None

    def log_message(self, *args: object) -> None:  # keep the test output readable
        pass

    def do_GET(self) -> None:
        busy, self.cut_after = self.server.plan(self.path.rsplit("/", 1)[-1])
        if busy:
            self.send_error(503, "busy")
            return
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:
        if self.cut_after is None:
            return super().copyfile(source, outputfile)
        nbytes, stall = self.cut_after
        outputfile.write(source.read(nbytes))  # Content-Length promised more: a dropped transfer
        outputfile.flush()
        time.sleep(stall)
        self.close_connection = True


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Path:
    """``data/``: a ``shards`` output folder (train: 7 tars, 76 samples); ``i2d/``: img2dataset tars + stats."""
    from shards.api import build

    root = tmp_path_factory.mktemp("www")
    build("synthetic", None, root / "data", count=96, image_size=32, shard_size=12, workers=1, progress=False)
    write_img2dataset(root / "i2d", 6)
    write_img2dataset(root / "i2d", 4, start=100)
    return root


@pytest.fixture(scope="module")
def server(www):
    srv = ShardServer(www)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def http(server) -> ShardServer:
    """The server with no faults and fresh hit counts."""
    server.reset()
    return server


def tar_names(www: Path) -> list[str]:
    return sorted(json.loads((www / "data" / "train" / "sizes.json").read_text()))


def pattern(base: str, www: Path) -> str:
    return f"{base}/data/train/train-{{000000..{len(tar_names(www)) - 1:06d}}}.tar"


def first_tar(cfg, www: Path) -> str:
    """The tar that worker 0 of rank 0 reads first in epoch 0 (whole: a shard of 12 < its range)."""
    names = tar_names(www)
    return names[shard_permutation(cfg.train.seed, 0, 0, len(names))[0]]


def remote_cfg(paths: list[str], **kw):
    cfg = make_cfg(paths, **kw)
    cfg.data.remote = FAST
    return cfg


# -- discovery ---------------------------------------------------------------------------------

def test_http_forms_find_the_same_shards_and_counts(http, www):
    local = discover_source(ShardSourceConfig(path=str(www / "data")))
    assert local.total == 76 and len(local.urls) == 7
    names = [Path(u).name for u in local.urls]
    folder = discover_source(ShardSourceConfig(path=f"{http.url}/data/"), FAST)
    assert folder.sizes == local.sizes and folder.urls[0] == f"{http.url}/data/train/{names[0]}"
    split = discover_source(ShardSourceConfig(path=f"{http.url}/data/train"), FAST)  # sizes.json right there
    assert split.urls == folder.urls and split.sizes == local.sizes
    brace = discover_source(ShardSourceConfig(path=pattern(http.url, www)), FAST)
    assert brace.sizes == local.sizes and [storage.file_name(u) for u in brace.urls] == names
    assert http.hits["sizes.json"] == 4  # folder: 1; .../train: 2 (its <split>/sizes.json is a 404); pattern: 1
    for sizes in (f"{http.url}/data/train/sizes.json", str(www / "data" / "train" / "sizes.json")):
        given = discover_source(ShardSourceConfig(path=pattern(http.url, www), sizes=sizes), FAST)
        assert given.sizes == local.sizes
    # img2dataset tars without sizes.json: counts from each tar's _stats.json, read over HTTP
    i2d = discover_source(ShardSourceConfig(path=f"{http.url}/i2d/{{00000..00001}}.tar"), FAST)
    assert i2d.sizes == (6, 4) and http.hits["00001_stats.json"] == 1


def test_http_discovery_errors_name_the_problem(http, www):
    with pytest.raises(ShardIndexError, match=r"no sizes.json for .*/i2d/: .*HTTP 404.*cannot be listed"):
        discover_source(ShardSourceConfig(path=f"{http.url}/i2d/"), FAST)
    with pytest.raises(ShardIndexError, match="train-000009.tar .*does not exist"):
        discover_source(ShardSourceConfig(path=f"{http.url}/data/train/train-{{000009..000010}}.tar"), FAST)
    with pytest.raises(ShardIndexError, match="sizes is for brace patterns"):
        discover_source(ShardSourceConfig(path=f"{http.url}/data/", sizes=f"{http.url}/data/train/sizes.json"))
    with pytest.raises(storage.NotFound, match="nope.json does not exist"):
        discover_source(ShardSourceConfig(path=pattern(http.url, www), sizes=f"{http.url}/nope.json"), FAST)


def test_fsspec_urls_folder_listing_and_loader(www):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for path in (www / "data" / "train").iterdir():
        fs.pipe_file(f"/orbit/data/train/{path.name}", path.read_bytes())
    for path in (www / "i2d").iterdir():
        fs.pipe_file(f"/orbit/i2d/{path.name}", path.read_bytes())
    try:
        mem = discover_source(ShardSourceConfig(path="memory://orbit/data"))
        assert mem.sizes == discover_source(ShardSourceConfig(path=str(www / "data"))).sizes
        listed = discover_source(ShardSourceConfig(path="memory://orbit/i2d"))  # no sizes.json: listed + stats
        assert listed.sizes == (6, 4) and listed.urls[0].endswith("/orbit/i2d/00000.tar")
        same_batches(take(iter(loader(make_cfg(["memory://orbit/data"]))), 5),
                     take(iter(loader(make_cfg([str(www / "data")]))), 5))
    finally:
        fs.rm("/orbit", recursive=True)


@pytest.mark.parametrize("scheme,package", [("s3", "s3fs"), ("gs", "gcsfs")])
def test_missing_fsspec_backend_is_one_clear_error(scheme, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    message = fr"{scheme}:// needs the {package} package \(pip install {package}\)"
    with pytest.raises(storage.StorageError, match=message):
        discover_source(ShardSourceConfig(path=f"{scheme}://bucket/data/"))


# -- reading -----------------------------------------------------------------------------------

def test_open_is_retried_but_a_started_stream_is_not(http, www):
    name = tar_names(www)[0]
    url, body = f"{http.url}/data/train/{name}", (www / "data" / "train" / name).read_bytes()
    http.unavailable[name] = 2
    reader = storage.open_shard(url, FAST)  # 503, 503, then served
    assert reader.read() == body and reader.lost is None and http.hits[name] == 3
    http.reset()
    http.unavailable[name] = 3
    with pytest.raises(storage.StorageError, match=r"HTTP 503 .*after 3 tries"):
        storage.open_shard(url, FAST)
    with pytest.raises(storage.NotFound):
        storage.open_shard(f"{http.url}/data/train/none.tar", FAST)
    assert http.hits["none.tar"] == 1  # a 404 is not retried
    http.reset()
    http.cut(name, CUT, times=1)
    reader = storage.open_shard(url, FAST)
    got = bytearray()
    with pytest.raises(storage.StreamLost, match=fr"closed before the announced {len(body)} bytes \(after {CUT} bytes"):
        while chunk := reader.read(10240):
            got += chunk
    assert bytes(got) == body[:CUT] and reader.read(10240) == b"" and http.hits[name] == 1
    with pytest.raises(storage.StorageError, match=r"Connection refused.*after 3 tries"):
        storage.open_shard(f"http://127.0.0.1:{free_port()}/x.tar", FAST)
    http.reset()
    http.cut(name, CUT, times=1, stall=3.0)  # the server goes silent mid-transfer
    reader = storage.open_shard(url, RemoteConfig(timeout=0.5, retries=0))
    with pytest.raises(storage.StreamLost, match=f"timed out \\(after {CUT} bytes"):
        while reader.read(10240):
            pass


def test_http_loader_equals_local_for_two_ranks_two_workers(http, www):
    for rank in range(2):
        runs = []
        for path in (str(www / "data"), f"{http.url}/data/"):
            dl = loader(remote_cfg([path], batch=8, workers=2), rank, 2)
            assert (dl.steps_per_epoch, dl.dropped_per_epoch) == (4, 12)
            runs.append(take(iter(dl), 8))  # two epochs
            assert dl.epoch == 2
        same_batches(*runs)
    assert http.hits[tar_names(www)[0]] >= 2


def test_dropped_connection_is_counted_and_every_rank_gets_its_batches(http, www):
    http.cut("*.tar", CUT, times=1)  # every tar's first transfer breaks at ~40 %
    stats = Counter()
    for rank in range(2):
        dl = loader(remote_cfg([f"{http.url}/data/"], batch=8, workers=2), rank, 2)
        batches = take(iter(dl), 2 * dl.steps_per_epoch)  # the loader raises if an epoch comes up short
        assert dl.epoch == 2 and all(len(b.keys) == 8 for b in batches)
        stats.update({k: v for k, v in dl.stats.items() if k != "dropped_per_epoch"})
    assert 2 <= stats["streams_lost"] <= len(tar_names(www)) and stats["skipped/connection_lost"] >= 10, stats
    # Each stream made up for its lost samples from a second pass over its range (whose
    # transfers were whole): every lost sample was counted, none twice.
    assert stats["repeated"] == stats["skipped/connection_lost"], stats
    assert stats.keys() <= {"streams_lost", "skipped/connection_lost", "repeated"}, stats


def test_a_tar_that_cannot_be_opened_is_counted_and_skipped(http, www, caplog):
    cfg = remote_cfg([f"{http.url}/data/"], batch=8, workers=0)
    gone = first_tar(cfg, www)
    http.unavailable[gone] = 1000  # 503 on every GET, beyond the retries
    dl = loader(cfg)
    keys = [k for b in take(iter(dl), dl.steps_per_epoch) for k in b.keys]
    assert len(keys) == 72 and http.hits[gone] >= 3  # the epoch is whole; the open was tried 1 + 2 times
    with tarfile.open(www / "data" / "train" / gone) as tar:
        assert not {m.name.split(".", 1)[0] for m in tar.getmembers()} & set(keys)
    assert dl.stats["shards_unavailable"] >= 1 and dl.stats["skipped/shard_unavailable"] >= 12
    assert f"cannot open {http.url}/data/train/{gone}, 12 samples of it skipped" in caplog.text


def test_the_sample_being_read_when_a_stream_breaks_is_dropped(http, www):
    name = tar_names(www)[0]
    with tarfile.open(www / "data" / "train" / name) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    last_file_of_5 = [m for m in members if m.name.startswith(keys[5] + ".")][-1]
    http.cut(name, last_file_of_5.offset_data + 10, times=1)  # sample 5 arrives without its last file
    dl = loader(remote_cfg([f"{http.url}/data/train/{name}"], batch=4, shuffle_buffer=0))
    got = [k for b in take(iter(dl), dl.steps_per_epoch) for k in b.keys]
    assert got == keys[:5] + keys[:7]  # 5 whole samples, then the 7 lost ones made up from a second pass
    assert (dl.stats["streams_lost"], dl.stats["skipped/connection_lost"], dl.stats["repeated"]) == (1, 7, 7)


def test_resume_mid_epoch_over_http_is_exact(http, www):
    cfg = remote_cfg([f"{http.url}/data/"], batch=8, workers=2)
    dl = loader(cfg)
    assert dl.steps_per_epoch == 9
    it, states, ref = iter(dl), [], []
    for _ in range(12):  # into the second epoch
        states.append(dl.state_dict())
        ref.append(next(it))
    for pos in (3, 8, 10):
        fresh = loader(cfg)
        fresh.load_state_dict(states[pos])
        same_batches(take(iter(fresh), 2), ref[pos:pos + 2])
    http.cut(first_tar(cfg, www), CUT, times=1)  # now lost while worker 0 fast-forwards through it: a new loss
    fresh = loader(cfg)
    fresh.load_state_dict(states[3])
    take(iter(fresh), 2)  # batch 3 from worker 1, batch 4 from worker 0 (with its counters)
    assert fresh.stats["streams_lost"] == 1 and fresh.stats["skipped/connection_lost"] > 0


def test_resume_replays_a_connection_lost_before_the_checkpoint(http, www):
    cfg = remote_cfg([f"{http.url}/data/"], batch=8, workers=2)
    http.cut(first_tar(cfg, www), CUT, times=1)
    dl = loader(cfg)
    it, states, ref = iter(dl), [], []
    for _ in range(9):
        states.append(dl.state_dict())
        ref.append(next(it))
    assert states[4]["counters"][0]["streams_lost"] == 1 and states[4]["cuts"][0]
    http.reset()  # healthy again: the resumed worker must still stop reading where the lost stream stopped
    fresh = loader(cfg)
    fresh.load_state_dict(states[4])
    same_batches(take(iter(fresh), 5), ref[4:9])
    assert fresh.stats == dl.stats and dl.stats["streams_lost"] == 1


def test_pipe_commands(http, www, caplog):
    train = www / "data" / "train"
    sizes = f"{http.url}/data/train/sizes.json"
    cmd = f"pipe:cat {train}/train-{{000000..{len(tar_names(www)) - 1:06d}}}.tar"
    assert pipe_shard_name("pipe:aws s3 cp s3://b/x/train-000003.tar -") == "train-000003.tar"
    with pytest.raises(ShardIndexError, match="cannot tell which tar"):
        pipe_shard_name("pipe:cat a.tar b.tar")
    piped = take(iter(loader(_pipe_cfg(cmd, sizes))), 6)
    same_batches(piped, take(iter(loader(make_cfg([str(www / "data")], batch=8, workers=2))), 6))
    with pytest.raises(ConfigError, match="sample counts of pipe:cat .* are unknown"):
        loader(_pipe_cfg(cmd, None))
    dl = loader(_pipe_cfg(cmd, None, resampled=True, samples_per_epoch=40))  # uniform draws of whole tars
    keys = [k for b in take(iter(dl), 5) for k in b.keys]
    assert len(keys) == 40 and dl.steps_per_epoch == 5 and not any(k.startswith("skipped") for k in dl.stats)
    # A command that fails after part of the tar: the loss is counted and logged, batches keep coming.
    broken = f"pipe:head -c {CUT} {train}/train-000000.tar && false"
    dl = loader(_pipe_cfg(broken, sizes, workers=0, batch=4))
    assert len(take(iter(dl), dl.steps_per_epoch)) == 3
    assert dl.stats["streams_lost"] >= 1 and dl.stats["skipped/connection_lost"] >= 1
    assert "exited with status 1" in caplog.text and "skipped/connection_lost" in caplog.text


def _pipe_cfg(cmd: str, sizes: str | None, *, workers: int = 2, batch: int = 8, **data):
    cfg = remote_cfg([cmd], batch=batch, workers=workers, **data)
    cfg.data.shards[0].sizes = sizes
    return cfg


def test_remote_settings_are_checked():
    with pytest.raises(ConfigError, match="data.remote needs timeout > 0"):
        load_config(None, ["data.source=synthetic", "train.steps=1", "data.remote.timeout=0"])


# -- python -m train ---------------------------------------------------------------------------

def _config(tmp: Path, shards: list[dict], steps: int = 4, **data) -> Path:
    cfg = {
        "run": {"root": str(tmp), "name": "run"},
        "model": {"name": "orbit-micro"},
        "data": {"batch_size": 8, "workers": 2, "shuffle_buffer": 16, "prefetch_factor": 2, "shards": shards,
                 "remote": {"timeout": 20.0, "retries": 1, "retry_wait": 0.05}, **data},
        "optim": {"warmup_steps": 2},
        "train": {"steps": steps, "checkpoint_every": 100, "log_every": 1, "progress": False},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "train", "--config", str(config),
           f"run.root={run_dir.parent}", f"run.name={run_dir.name}"]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_python_m_train_over_http_equals_local(http, www, tmp_path):
    from train.trainer import run

    (tmp_path / "http").mkdir()
    proc = _start(_config(tmp_path / "http", [{"path": f"{http.url}/data/"}]), tmp_path / "http" / "run")
    local = run(load_config(_config(tmp_path, [{"path": str(www / "data")}]), [f"run.root={tmp_path}"]))
    rc, err = _finish(proc)
    assert rc == 0 and local.status == "finished", err[-3000:]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (local.run_dir, tmp_path / "http" / "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert http.hits[tar_names(www)[0]] >= 1


def test_python_m_train_goes_on_after_a_dropped_connection(http, www, tmp_path):
    http.cut("*.tar", CUT, times=1)
    rc, err = _finish(_start(_config(tmp_path, [{"path": f"{http.url}/data/"}], steps=6), tmp_path / "run"))
    assert rc == 0, err[-3000:]
    lost = r"WARNING lost http://\S+\.tar after 20000 bytes \(connection closed before the announced \d+ bytes\)"
    assert re.search(lost, err) and "(skipped/connection_lost); training goes on" in err, err[-3000:]
    counters = re.search(r"data loader counters: (\{.*\})", err)
    assert counters and "'streams_lost'" in counters.group(1), err[-3000:]
    assert (tmp_path / "run" / "model.pt").is_file()


def test_python_m_train_user_errors_are_one_line(http, tmp_path, capsys):
    from train.cli import main

    unreachable = f"http://127.0.0.1:{free_port()}/data/"
    cases = {
        "no_sizes": (f"{http.url}/nothing/", "no sizes.json for"),
        "pipe_no_sizes": ("pipe:cat x.tar", "are unknown"),
        "unreachable": (unreachable, "Connection refused"),
    }
    if importlib.util.find_spec("s3fs") is None:
        cases["s3"] = ("s3://bucket/data/", "needs the s3fs package (pip install s3fs)")
    proc = _start(_config(tmp_path, [{"path": unreachable}]), tmp_path / "run")  # one real process exit
    for name, (path, message) in cases.items():  # the same entry point, in this process (fast)
        (tmp_path / name).mkdir()
        assert main(["--config", str(_config(tmp_path / name, [{"path": path}]))]) == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, f"{name}: {err}"
    rc, err = _finish(proc)
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: cannot read {unreachable}train/sizes.json: [Errno 111] Connection refused (after 2 tries)"]


@pytest.mark.slow
def test_python_m_train_sigkill_resume_over_http_is_bit_identical(http, www, tmp_path):
    from tests.train.test_trainer_resume import assert_same_weights, finish, kill_at_step, start, write_config

    config = write_config(tmp_path / "cfg.yaml", {
        "source": "shards", "workers": 2, "shuffle_buffer": 16, "prefetch_factor": 2,
        "shards": [{"path": f"{http.url}/data/"}],
    })
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    baseline = start(config, base_dir)
    kill_at_step(start(config, run_dir), 5)
    finish(start(config, run_dir), 0)
    finish(baseline, 0)
    assert_same_weights(run_dir, base_dir)
