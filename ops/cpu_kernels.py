"""The C++ kernels of a CPU's BF16 graphs: built, cached, loaded, and their custom ops defined.

Two libraries, built with the system C++ compiler the first time they are needed and cached in
GLM5C_KERNEL_CACHE (default ~/.cache/glm5c/kernels) under a key hashing the sources, the flags,
the compiler, this CPU's flags (they are built for this CPU: -march=native) and, for the second,
torch's version:
  - "kernels" (ops/cpu/bf16_kernels.cpp, ~1 s): the kernels behind a C ABI, called through ctypes
    by each op's Python implementation (ops/cpu_linear.py, moe_cpu.py, dsa_cpu.py);
  - "ops" (ops/cpu/bf16_ops.cpp, ~5 s: torch's headers): the same kernels registered as the ops'
    CPU implementations, which a compiled graph then reaches with no Python per call.
The runner loads both before the first step, so no request pays for a build. Where "ops" cannot
be built the Python implementations serve (warned once); where neither can (no compiler) `load`
returns None and the ops run torch's forms: slower, same result.
"""

from __future__ import annotations

import ctypes
import functools
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
from torch import Tensor

from .cutlass.build import cache_dir

SOURCES = {"kernels": Path(__file__).resolve().parent / "cpu" / "bf16_kernels.cpp",
           "ops": Path(__file__).resolve().parent / "cpu" / "bf16_ops.cpp"}  # fmt: skip
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
ABI_VERSION = 5


def _torch_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for a library against the installed torch."""
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return ([abi, *(f"-I{p}" for p in cpp_extension.include_paths())],
            [*(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"])  # fmt: skip


class CpuKernelBuildError(RuntimeError):
    """No C++ compiler, or the build failed (the message has the compiler's output)."""


@functools.cache
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


@functools.cache
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout


def build(cache: str | os.PathLike | None = None, force: bool = False, extra_flags: tuple[str, ...] = (),
          name: str = "kernels") -> Path:  # fmt: skip
    """The shared library SOURCES[name] built for this CPU (cached unless `force`); `extra_flags`
    (e.g. -mno-avx512f, to test the portable paths) go after FLAGS."""
    cxx = _compiler()
    source = SOURCES[name]
    compile_flags, link_flags = _torch_flags() if name == "ops" else ([], [])
    flags = [*FLAGS, "-std=c++20" if name == "ops" else "-std=c++17", *compile_flags, *extra_flags]
    version = _compiler_version(cxx)
    parts = [*(p.read_bytes() for p in SOURCES.values()), " ".join(flags + link_flags), version, _cpu_flags(),
             torch.__version__]  # fmt: skip
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in parts)).hexdigest()[:16]
    out_dir = cache_dir(cache)
    target = out_dir / f"{source.stem}-{key}.so"
    if target.is_file() and not force:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *flags, str(source), "-o", tmp, *link_flags]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as e:
            raise CpuKernelBuildError(f"{cxx} timed out building {source.name}") from e
        if done.returncode != 0:
            raise CpuKernelBuildError(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


_lib: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernels cannot be used here, once known
_ops_loaded: bool | str = False  # True once the ops' C++ implementations are registered, or why they are not


def load() -> ctypes.CDLL | None:
    """The kernels' library (built first if needed) and, once, the ops' C++ implementations; None
    where the kernels cannot be built: then the reason is warned once and the ops run torch's forms."""
    global _lib, _unavailable, _ops_loaded
    if _lib is not None or _unavailable is not None:
        return _lib
    try:
        _lib = open_library(build())
    except (CpuKernelBuildError, OSError, subprocess.SubprocessError) as e:
        _unavailable = f"{type(e).__name__}: {e}"
        warnings.warn(f"the CPU kernels (ops/cpu/{SOURCES['kernels'].name}) are unavailable, running torch's "
                      f"slower forms: {_unavailable}", RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    try:
        torch.ops.load_library(str(build(name="ops")))
        _ops_loaded = True
    except (CpuKernelBuildError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        _ops_loaded = f"{type(e).__name__}: {e}"
        warnings.warn(f"the CPU kernels' torch ops (ops/cpu/{SOURCES['ops'].name}) are unavailable, calling the "
                      f"kernels through Python: {_ops_loaded}", RuntimeWarning, stacklevel=2)  # fmt: skip
    return _lib


def blocked_kernels(op: str) -> ctypes.CDLL:
    """The kernels' library, which blocked weights (block_weight) need built with AVX512-BF16:
    else a clear error naming `op`."""
    lib = load()
    if lib is None or not lib.glm5c_has_avx512bf16():
        raise RuntimeError(f"{op}: blocked weights need the kernel built with AVX512-BF16; "
                           "pack only where ops.cpu_kernels.has_avx512_bf16()")  # fmt: skip
    return lib


def open_library(path: str | os.PathLike) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.glm5c_abi_version() != ABI_VERSION:
        raise CpuKernelBuildError(f"{path}: library ABI {lib.glm5c_abi_version()}, expected {ABI_VERSION}")
    for fn in (lib.glm5c_moe_experts_bf16, lib.glm5c_moe_experts_packed_bf16):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    fn = lib.glm5c_moe_experts_shared_packed_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    fn = lib.glm5c_linear_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 8 + [ctypes.c_int] * 2
    fn = lib.glm5c_linear_packed_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    fn = lib.glm5c_linear_packed_multi_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn = lib.glm5c_sparse_mla_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 9 + [ctypes.c_float, ctypes.c_int]
    fn = lib.glm5c_indexer_topk_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 8 + [ctypes.c_int]
    fn = lib.glm5c_route_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_int, ctypes.c_float, ctypes.c_int]
    return lib


def check_tensors(op: str, **want: tuple) -> None:
    """Each name=(tensor, dtype, dims) must be a CPU tensor of that dtype and rank (ValueError naming it)."""
    for name, (t, dtype, dims) in want.items():
        if t.device.type != "cpu" or t.dtype != dtype or t.dim() != dims:
            raise ValueError(f"{op}: {name} is {t.dtype} {tuple(t.shape)} on {t.device}, expected a {dims}-d "
                             f"{dtype} tensor on cpu")  # fmt: skip


def check_status(op: str, rc: int, outside: str = "an index") -> None:
    """A kernel's return code: 2 = `outside` lies outside the block table or the cache (nothing was read
    there), other non-zero = arguments rejected."""
    if rc == 2:
        raise IndexError(f"{op}: {outside} lies outside the block table or the cache")
    if rc != 0:
        raise RuntimeError(f"{op}: the kernel rejected its arguments (code {rc})")


# The kernels' blocked weight layout (packed tiles, bf16_kernels.cpp: packed_tile): a matrix [N, K]
# as [N / 16, K / 2, 16, 2], so a 64-byte load is one element pair of 16 rows and each tile of 16
# rows is one contiguous stream. Weights are blocked once, at load (Ops.pack_linear, pack_experts).
BLOCK_ROWS = 16


def block_weight(w: Tensor) -> Tensor:
    """[..., N, K] -> blocked [..., N / 16, K / 2, 16, 2]: element (n, k) at [n // 16, k // 2, n % 16, k % 2]."""
    *lead, n, k = w.shape
    if n % BLOCK_ROWS or k % 2 or w.element_size() != 2:
        raise ValueError(f"block_weight: {w.dtype} [..., N, K] = {tuple(w.shape)} needs 2-byte elements, N a multiple "
                         f"of {BLOCK_ROWS} and K even")  # fmt: skip
    # moved as 32-bit pairs: a transpose of [16, K / 2] blocks (4.7x faster than moving bf16 elements)
    pairs = w.contiguous().view(torch.int32).reshape(*lead, n // BLOCK_ROWS, BLOCK_ROWS, k // 2)
    return pairs.transpose(-1, -2).contiguous().view(w.dtype).reshape(*lead, n // BLOCK_ROWS, k // 2, BLOCK_ROWS, 2)


def unblock_weight(w: Tensor) -> Tensor:
    """block_weight's inverse: [..., N / 16, K / 2, 16, 2] -> [..., N, K]."""
    *lead, nb, k2, rows, two = w.shape
    d = len(lead)
    return w.permute(*range(d), d, d + 2, d + 1, d + 3).reshape(*lead, nb * rows, k2 * two)


def blockable(w: Tensor) -> bool:
    """Whether the kernels take `w` ([..., N, K]) blocked: built with AVX512-BF16, a BF16 CPU tensor,
    N a multiple of 16, K even."""
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() >= 2 and w.shape[-2] % BLOCK_ROWS == 0
            and w.shape[-1] % 2 == 0 and has_avx512_bf16())  # fmt: skip


def has_avx512_bf16() -> bool:
    """Whether the kernels were built with AVX512-BF16 dot products (else fp32 FMAs)."""
    lib = load()
    return bool(lib is not None and lib.glm5c_has_avx512bf16())


_ops_library = torch.library.Library("glm5c", "FRAGMENT")  # noqa: TOR901 (each op is defined once, at import)


def define_op(schema: str, kernel: Callable, fake: Callable) -> None:
    """Define the custom op `glm5c::<schema>` that a graph calls opaquely: `kernel(*args)` is its
    Python implementation (the kernel through ctypes), registered under CompositeExplicitAutograd so
    that the C++ one bf16_ops.cpp registers for CPU outranks it once loaded; `fake(*args)` gives its
    output's shape to a trace."""
    name = schema.split("(", 1)[0]
    _ops_library.define(schema)
    _ops_library.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"glm5c::{name}", fake, lib=_ops_library)
