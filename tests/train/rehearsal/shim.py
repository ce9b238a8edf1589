"""Build (once per source/torch/compiler) the fake-CUDA shared library of ``fake_cuda.cpp``.

The library is cached under ``.cache/rehearsal/`` (gitignored), named after a digest of
its source, the torch version and the compile command, so an edit rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from tests import REPO_ROOT

SOURCE = Path(__file__).with_name("fake_cuda.cpp")
BUILD_DIR = REPO_ROOT / ".cache" / "rehearsal"


class ShimUnavailable(RuntimeError):
    """No compiler or no torch C++ headers here: the rehearsal cannot run (a skip, not a failure)."""


def compile_command(out: Path) -> list[str]:
    """The g++ line for ``out``, against the installed torch's headers and libraries."""
    import torch
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    header = Path(includes[0]) / "ATen" / "detail" / "CUDAHooksInterface.h"
    if not header.is_file():
        raise ShimUnavailable(f"torch's C++ headers are not installed ({header} is missing)")
    gxx = shutil.which("g++")
    if gxx is None:
        raise ShimUnavailable("g++ is not on PATH: cannot build the fake CUDA shim")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = cpp_extension.library_paths()
    return [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *[f"-I{p}" for p in includes], str(SOURCE), *[f"-L{p}" for p in libs], "-lc10", "-ltorch_cpu",
            *[f"-Wl,-rpath,{p}" for p in libs], "-o", str(out)]


def build() -> Path:
    """The path of the built library (compiled now if the cache has no current one).

    Raises:
        ShimUnavailable: no g++ or no torch headers.
        RuntimeError: the compile failed (its output in the message).
    """
    import torch

    probe = compile_command(Path("OUT"))
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(probe).encode()).hexdigest()
    out = BUILD_DIR / f"fake_cuda-{digest[:16]}.so"
    if out.is_file():
        return out
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    done = subprocess.run(compile_command(tmp), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the fake CUDA shim failed:\n{done.stdout}\n{done.stderr}")
    tmp.replace(out)  # atomic: a concurrent build never sees half a library
    return out


if __name__ == "__main__":
    print(build())
