"""A one-machine stand-in for SLURM's sbatch/srun/sacct/scancel/scontrol, for tests.

Enough of SLURM for submitit's real SlurmExecutor code path to run end to end:

- ``sbatch SCRIPT`` prints ``Submitted batch job ID`` and starts the script in the
  background (submitit writes the job's pickle only after sbatch returns), once per
  array index, with SLURM_JOB_ID/NTASKS/... set from the ``#SBATCH`` lines; all
  nodes are this machine under names that resolve here (:data:`NODE_NAMES`:
  ``SLURM_JOB_NODELIST=localhost`` for one node, ``localhost,127.0.0.1`` for two).
- ``srun [--output F --error F ...] CMD`` starts nodes x ntasks-per-node copies of
  CMD with SLURM_PROCID/LOCALID/NODEID, output into the %j/%t/%A/%a-expanded files.
  Each node's tasks form a process group of their own, with that node's
  SLURMD_NODENAME, as on separate machines: ``<id>.node<N>.pgid`` names it, so a test
  can stop or kill one node (``os.killpg``).
- ``scontrol show hostnames [LIST]`` prints the names of a node list (default: the job's).
- ``scontrol requeue ID`` kills the job's tasks and runs its batch script again
  (state REQUEUED in between), as SLURM does.
- ``scancel [--signal SIG] ID`` signals the job's tasks (no signal: cancel).
- ``sacct -o JobID,State,NodeList --parsable2 -j ID`` reports states.

State lives in ``$FAKE_SLURM_STATE``: ``<id>.state``, ``<id>.pids`` (task pids),
``<id>.runs`` (how many times the batch script started), ``<id>.runner`` (pid of the
background runner, a session leader: kill its process group to clean up).
Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

MAX_RUNS = 10  # a requeue loop in a broken test must end
NODE_NAMES = ("localhost", "127.0.0.1")
"""Node names of a job, in order: distinct names that resolve to this machine."""


def state_dir() -> Path:
    path = os.environ.get("FAKE_SLURM_STATE")
    if not path:
        sys.exit("fake slurm: FAKE_SLURM_STATE is not set")
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def sbatch_options(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(.*))?$", line.strip())
        if m:
            opts[m.group(1)] = (m.group(2) or "").strip("'\"")
    return opts


def _next_id(sd: Path) -> int:
    with open(sd / "next_id.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counter = sd / "next_id"
        jid = int(counter.read_text()) if counter.exists() else 1001
        counter.write_text(str(jid + 1))
    return jid


def sbatch(args: list[str]) -> int:
    sd = state_dir()
    script = Path(args[-1]).resolve()
    opts = sbatch_options(script)
    jid = _next_id(sd)
    members = [str(jid)]
    if "array" in opts:
        lo, hi = re.match(r"(\d+)-(\d+)", opts["array"]).groups()
        members = [f"{jid}_{i}" for i in range(int(lo), int(hi) + 1)]
    for member in members:
        _write(sd / f"{member}.state", "PENDING")
        with open(sd / f"{member}.runner.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, __file__, "_run", member, str(script)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        _write(sd / f"{member}.runner", str(proc.pid))
    print(f"Submitted batch job {jid}")
    return 0


def _run(args: list[str]) -> int:
    """Background runner of one job (or array member): runs the batch script, again if requeued."""
    sd = state_dir()
    member, script = args[0], Path(args[1])
    opts = sbatch_options(script)
    nodes = int(opts.get("nodes", "1"))
    per_node = int(opts.get("ntasks-per-node", "1"))
    if nodes > len(NODE_NAMES):
        sys.exit(f"fake slurm: at most {len(NODE_NAMES)} nodes, got --nodes={nodes}")
    nodelist = ",".join(NODE_NAMES[:nodes])
    env = dict(os.environ)
    base, _, index = member.partition("_")
    env.update(
        SLURM_JOB_ID=str(int(base) * 100 + int(index or 0)) if index else base,
        SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
        SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(nodes * per_node),
        SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist,
        SLURM_SUBMIT_DIR=os.getcwd(), FAKE_SLURM_MEMBER=member,
    )
    if index:
        env.update(SLURM_ARRAY_JOB_ID=base, SLURM_ARRAY_TASK_ID=index)
    for run in range(1, MAX_RUNS + 1):
        _write(sd / f"{member}.state", "RUNNING")
        _write(sd / f"{member}.runs", str(run))
        rc = subprocess.call(["bash", str(script)], env=env)
        flag = sd / f"{member}.requeue"
        if flag.exists() and (sd / f"{member}.state").read_text() != "CANCELLED":
            flag.unlink()
            _write(sd / f"{member}.state", "REQUEUED")
            continue
        break
    if (sd / f"{member}.state").read_text() != "CANCELLED":
        _write(sd / f"{member}.state", "COMPLETED" if rc == 0 else "FAILED")
    return 0


def _expand(pattern: str, task: int) -> str:
    env = os.environ
    return (
        pattern.replace("%j", env.get("SLURM_JOB_ID", "0"))
        .replace("%t", str(task))
        .replace("%A", env.get("SLURM_ARRAY_JOB_ID", ""))
        .replace("%a", env.get("SLURM_ARRAY_TASK_ID", ""))
    )


def srun(args: list[str]) -> int:
    sd = state_dir()
    out = err = None
    i = 0
    while i < len(args) and args[i].startswith("-"):
        opt = args[i]
        if opt in ("--output", "-o", "--error", "-e"):
            if opt in ("--output", "-o"):
                out = args[i + 1]
            else:
                err = args[i + 1]
            i += 2
        elif "=" in opt or opt in ("--unbuffered", "-u"):
            i += 1
        else:
            sys.exit(f"fake srun: option {opt} not supported")
    command = args[i:]
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", str(ntasks)))
    names = _hostnames(os.environ.get("SLURM_JOB_NODELIST", "localhost"))
    member = os.environ.get("FAKE_SLURM_MEMBER", os.environ.get("SLURM_JOB_ID", "0"))
    procs: list[subprocess.Popen] = []
    group = 0
    for t in range(ntasks):
        node, local = divmod(t, per_node)
        env = dict(os.environ, SLURM_PROCID=str(t), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                   SLURM_STEP_ID="0", SLURMD_NODENAME=names[node % len(names)])
        for pattern in (out, err):
            if pattern:  # SLURM needs the folder to exist; submitit creates it after sbatch returns
                Path(_expand(pattern, t)).parent.mkdir(parents=True, exist_ok=True)
        stdout = open(_expand(out, t), "a") if out else None
        stderr = open(_expand(err, t), "a") if err else None
        # The first task of a node leads its node's process group; the others join it.
        procs.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr,
                                      process_group=0 if local == 0 else group))
        if local == 0:
            group = procs[-1].pid
            _write(sd / f"{member}.node{node}.pgid", str(group))
    _write(sd / f"{member}.pids", "\n".join(str(p.pid) for p in procs))
    codes = [p.wait() for p in procs]
    return max((abs(c) for c in codes), default=0)


def _members(sd: Path, jid: str) -> list[str]:
    if (sd / f"{jid}.state").exists():
        return [jid]
    return sorted(p.name[: -len(".state")] for p in sd.glob(f"{jid}_*.state"))


def sacct(args: list[str]) -> int:
    sd = state_dir()
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for jid in ids:
        for member in _members(sd, jid):
            print(f"{member}|{(sd / f'{member}.state').read_text()}|localhost")
    return 0


def _signal_tasks(sd: Path, member: str, sig: int) -> None:
    pids = sd / f"{member}.pids"
    if not pids.exists():
        return
    for pid in pids.read_text().split():
        try:
            os.kill(int(pid), sig)
        except ProcessLookupError:
            pass


def scancel(args: list[str]) -> int:
    sd = state_dir()
    sig_name, ids, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a in ("--signal", "-s"):
            sig_name, i = args[i + 1], i + 2
            continue
        if a.startswith("--signal="):
            sig_name = a.split("=", 1)[1]
        else:
            ids.append(a)
        i += 1
    for jid in ids:
        for member in _members(sd, jid):
            if sig_name is None:
                _write(sd / f"{member}.state", "CANCELLED")
                _signal_tasks(sd, member, signal.SIGTERM)
            else:
                name = sig_name.upper()
                _signal_tasks(sd, member, getattr(signal, name if name.startswith("SIG") else "SIG" + name))
    return 0


def _hostnames(nodelist: str) -> list[str]:
    # Our node names are plain (no ``prefix[1-3]`` ranges), so a comma split is the whole syntax.
    return [n for n in nodelist.split(",") if n]


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"] and len(args) <= 3:
        nodelist = args[2] if len(args) == 3 else os.environ.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            sys.exit("fake scontrol: show hostnames needs a node list (or SLURM_JOB_NODELIST)")
        print("\n".join(_hostnames(nodelist)))
        return 0
    if len(args) != 2 or args[0] != "requeue":
        sys.exit(f"fake scontrol: only 'requeue ID' and 'show hostnames [LIST]' are supported, got {args}")
    sd = state_dir()
    members = _members(sd, args[1])
    if not members:
        sys.exit(f"fake scontrol: invalid job id {args[1]}")
    for member in members:
        (sd / f"{member}.requeue").touch()
        # Like SLURM, a requeue ends the running job at once (the caller included); the
        # runner then starts the batch script again.
        _signal_tasks(sd, member, signal.SIGKILL)
    return 0


def wait_state(sd: Path, member: str, states: set[str], timeout: float) -> str:
    """Poll until the job is in one of ``states`` (for tests); returns the state."""
    deadline = time.time() + timeout
    path = sd / f"{member}.state"
    while time.time() < deadline:
        state = path.read_text() if path.exists() else ""
        if state in states:
            return state
        time.sleep(0.2)
    raise TimeoutError(f"job {member} still {path.read_text() if path.exists() else 'unknown'} after {timeout}s")


def kill_all(sd: Path) -> None:
    """Kill every runner started under ``sd`` and its tasks (test teardown)."""
    for runner in [*sd.glob("*.runner"), *sd.glob("*.node*.pgid")]:  # node groups are groups of their own
        try:
            os.killpg(int(runner.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


COMMANDS = {"sbatch": sbatch, "_run": _run, "srun": srun, "sacct": sacct, "scancel": scancel, "scontrol": scontrol}

if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
