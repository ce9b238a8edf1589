"""Run a package's command line like a user would, several invocations per interpreter.

Each invocation is ``python -m PACKAGE ARGS`` executed through ``runpy`` in one fresh
subprocess (the imports, ~3 s on 2 cores, are paid once per group of cases), with its
own captured stdout/stderr and exit code. An uncaught exception is printed the way the
interpreter would print it (a ``Traceback`` on stderr, exit code 1), so tests can check
that user errors never produce one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_MARK = "CLI-CASES-RESULT:"
_DRIVER = f"""
import contextlib, io, json, runpy, sys, traceback
module, cases, out = sys.argv[1], json.load(sys.stdin), {{}}
for name, argv in cases.items():
    so, se = io.StringIO(), io.StringIO()
    sys.argv = [module, *argv]
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    out[name] = {{"code": code, "stdout": so.getvalue(), "stderr": se.getvalue()}}
print({_MARK!r} + json.dumps(out))
"""


@dataclass
class CliResult:
    """What one invocation printed and returned."""

    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """Non-empty stderr lines, minus library warnings that are not ours."""
        return [ln for ln in self.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING:root:")]


def run_cli_cases(package: str, cases: dict[str, list[str]], timeout: float = 600) -> dict[str, CliResult]:
    """``python -m package *argv`` for every case, in order, in one subprocess run from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, package], input=json.dumps(cases), capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
    assert proc.returncode == 0 and line, f"driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return {name: CliResult(**r) for name, r in json.loads(line[len(_MARK):]).items()}
