"""The C++ kernels of a CPU's BF16 graphs (ops/cpu/bf16_kernels.cpp): built, cached, loaded.

The source is built with the system C++ compiler the first time it is needed (~1 s), cached in
GLM5C_KERNEL_CACHE (default ~/.cache/glm5c/kernels) under a key hashing the source, the flags, the
compiler and this CPU's flags (it is built for this CPU: -march=native), and called through
ctypes, which releases the GIL. `glm5c compile` and the runner load it before anything runs, so
no request pays for the build. Where it cannot be built (no compiler) `load` warns once and
returns None, and the ops that use it (moe_cpu, cpu_linear) run torch's forms: slower, same result.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from .cutlass.build import cache_dir

SOURCE = Path(__file__).resolve().parent / "cpu" / "bf16_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
ABI_VERSION = 1


class CpuKernelBuildError(RuntimeError):
    """No C++ compiler, or the build failed (the message has the compiler's output)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    named = os.environ.get("CXX")
    cxx = shutil.which(named) if named else shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise CpuKernelBuildError(f"no C++ compiler found ({'$CXX=' + named if named else 'g++ or c++ on PATH'})")
    return cxx


def build(cache: str | os.PathLike | None = None, force: bool = False, extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library built from SOURCE for this CPU (cached unless `force`); `extra_flags`
    (e.g. -mno-avx512bf16, to test the portable path) go after FLAGS."""
    cxx = _compiler()
    flags = [*FLAGS, *extra_flags]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
        SOURCE.read_bytes(), " ".join(flags), version, _cpu_flags()))).hexdigest()[:16]  # fmt: skip
    out_dir = cache_dir(cache)
    target = out_dir / f"{SOURCE.stem}-{key}.so"
    if target.is_file() and not force:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *flags, str(SOURCE), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as e:
            raise CpuKernelBuildError(f"{cxx} timed out building {SOURCE.name}") from e
        if done.returncode != 0:
            raise CpuKernelBuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


_lib: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernel cannot be used here, once known


def load() -> ctypes.CDLL | None:
    """The library (built first if needed), or None where it cannot be built: then the reason is
    warned once and the ops run torch's forms."""
    global _lib, _unavailable
    if _lib is not None or _unavailable is not None:
        return _lib
    try:
        _lib = open_library(build())
    except (CpuKernelBuildError, OSError, subprocess.SubprocessError) as e:
        _unavailable = f"{type(e).__name__}: {e}"
        warnings.warn(f"the CPU kernels (ops/cpu/{SOURCE.name}) are unavailable, running torch's slower forms: "
                      f"{_unavailable}",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    return _lib


def open_library(path: str | os.PathLike) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.glm5c_abi_version() != ABI_VERSION:
        raise CpuKernelBuildError(f"{path}: library ABI {lib.glm5c_abi_version()}, expected {ABI_VERSION}")
    fn = lib.glm5c_moe_experts_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    fn = lib.glm5c_linear_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    fn = lib.glm5c_sparse_mla_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 9 + [ctypes.c_float, ctypes.c_int]
    return lib


def has_avx512_bf16() -> bool:
    """Whether the kernels were built with AVX512-BF16 dot products (else fp32 FMAs)."""
    lib = load()
    return bool(lib is not None and lib.glm5c_has_avx512bf16())


_ops_library = torch.library.Library("glm5c", "FRAGMENT")  # noqa: TOR901 (each op is defined once, at import)


def define_op(schema: str, kernel: Callable, fake: Callable) -> None:
    """Define the custom op `glm5c::<schema>` that a graph calls opaquely: `kernel(*args)` runs it
    on a CPU (eagerly, through this library), `fake(*args)` gives its output's shape to a trace."""
    name = schema.split("(", 1)[0]
    _ops_library.define(schema)
    _ops_library.impl(name, kernel, "CPU")
    torch.library.register_fake(f"glm5c::{name}", fake, lib=_ops_library)
