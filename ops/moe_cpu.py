"""MoE experts for a CPU's BF16 graphs: a C++ kernel that reads each chosen expert's weights once.

`experts` computes what `moe.experts_ref` defines, for BF16 activations and unquantized BF16
expert stacks, as one opaque custom op (`glm5c::moe_experts_cpu`) that a compiled graph calls:
ops/cpu/moe_experts.cpp groups the (token, expert) pairs and streams every chosen expert's rows
once for all of its tokens (AVX512-BF16 dot products where the CPU has them), with experts_ref's
bf16 roundings. The torch forms it replaces each waste something on a CPU: torch's grouped GEMM
calls a GEMM per expert (~15-20 us of overhead each), the dense form does E/top_k times the
flops, and the gathered form re-reads an expert per pair. Measured on mini (2-core EPYC,
bench/cpu_experts.py): 2.1x faster than the dense form at 16 tokens, 10x at 1, 1.6x at 128.

The source is built with the system C++ compiler the first time it is needed (~1 s), cached in
GLM5C_KERNEL_CACHE (default ~/.cache/glm5c/kernels) under a key hashing the source, the flags, the
compiler and this CPU's flags (it is built for this CPU: -march=native), and called through
ctypes, which releases the GIL. `glm5c compile` and the runner build it before anything runs, so
no request pays for it. Where it cannot be built (no compiler) the op warns once and runs the
torch forms instead (dense for few tokens per expert, else the grouped GEMM): slower, same result.
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
from torch import Tensor

from . import moe
from .cutlass.build import cache_dir

SOURCE = Path(__file__).resolve().parent / "cpu" / "moe_experts.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
ABI_VERSION = 1
GATHERED_MAX_PAIRS_PER_EXPERT = 0.25  # experts(): Inductor's gathered loops while T * top_k <= this * E_local,
KERNEL_MAX_PAIRS_PER_EXPERT = 32  # then the kernel while T * top_k <= this * E_local, then torch's grouped GEMM


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
    target = out_dir / f"moe_experts_cpu-{key}.so"
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
    """The kernel library (built first if needed), or None where it cannot be built: then the
    reason is warned once and the op runs torch's forms."""
    global _lib, _unavailable
    if _lib is not None or _unavailable is not None:
        return _lib
    try:
        _lib = open_library(build())
    except (CpuKernelBuildError, OSError, subprocess.SubprocessError) as e:
        _unavailable = f"{type(e).__name__}: {e}"
        warnings.warn(f"the CPU experts kernel is unavailable, running torch's slower forms: {_unavailable}",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    return _lib


def open_library(path: str | os.PathLike) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.glm5c_abi_version() != ABI_VERSION:
        raise CpuKernelBuildError(f"{path}: library ABI {lib.glm5c_abi_version()}, expected {ABI_VERSION}")
    fn = lib.glm5c_moe_experts_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    return lib


def has_avx512_bf16() -> bool:
    """Whether the kernel was built with AVX512-BF16 dot products (else fp32 FMAs)."""
    lib = load()
    return bool(lib is not None and lib.glm5c_has_avx512bf16())


def _check(x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> None:
    tokens, hidden = x.shape
    n_experts, inter, _ = gate.shape
    want = {"x": (x, (tokens, hidden), torch.bfloat16), "expert_ids": (expert_ids, (tokens, expert_ids.shape[1]), torch.int64),
            "expert_weights": (expert_weights, tuple(expert_ids.shape), torch.float32),
            "gate_proj": (gate, (n_experts, inter, hidden), torch.bfloat16),
            "up_proj": (up, (n_experts, inter, hidden), torch.bfloat16),
            "down_proj": (down, (n_experts, hidden, inter), torch.bfloat16)}  # fmt: skip
    for name, (t, shape, dtype) in want.items():
        if t.device.type != "cpu" or tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"moe_experts_cpu: {name} is {t.dtype} {tuple(t.shape)} on {t.device}, "
                             f"expected {dtype} {shape} on cpu")  # fmt: skip


def experts_bf16(x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate_proj: Tensor, up_proj: Tensor,
                 down_proj: Tensor, first_expert: int, lib: ctypes.CDLL | None = None) -> Tensor:  # fmt: skip
    """The kernel, eagerly: x [T, D] bf16 -> [T, D] bf16 (experts_ref's result); `lib` defaults to load()'s."""
    _check(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj)
    lib = lib if lib is not None else load()
    if lib is None:
        return _torch_forms(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, first_expert)
    x, ids, w = x.contiguous(), expert_ids.contiguous(), expert_weights.contiguous()
    gate, up, down = gate_proj.contiguous(), up_proj.contiguous(), down_proj.contiguous()
    out = torch.empty_like(x)
    n_experts, inter, hidden = gate.shape
    rc = lib.glm5c_moe_experts_bf16(x.data_ptr(), ids.data_ptr(), w.data_ptr(), gate.data_ptr(), up.data_ptr(),
                                    down.data_ptr(), out.data_ptr(), x.shape[0], ids.shape[1], hidden, inter,
                                    n_experts, first_expert, torch.get_num_threads())  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"moe_experts_cpu: the kernel rejected its arguments (code {rc})")
    return out


def _torch_forms(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, first_expert) -> Tensor:
    from . import linear_ref

    args = (x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, (None, None, None), first_expert, linear_ref)
    if x.shape[0] * expert_ids.shape[1] <= moe.DENSE_MAX_ROWS_PER_EXPERT * gate_proj.shape[0]:
        return moe.experts_dense(*args)
    return moe.experts_grouped_mm(*args)


_library = torch.library.Library("glm5c", "FRAGMENT")  # noqa: TOR901 (the op is registered once, at import)
_library.define("moe_experts_cpu(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor gate_proj, "
                "Tensor up_proj, Tensor down_proj, int first_expert) -> Tensor")  # fmt: skip
_library.impl("moe_experts_cpu", lambda *args: experts_bf16(*args), "CPU")


@torch.library.register_fake("glm5c::moe_experts_cpu", lib=_library)
def _(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, first_expert):
    return torch.empty_like(x)


def experts(
    x: Tensor,  # [T, D] bf16
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D] bf16
    up_proj: Tensor,  # [E_local, I, D] bf16
    down_proj: Tensor,  # [E_local, D, I] bf16
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """Ops.experts for a CPU's BF16 graphs: the kernel as the opaque op `glm5c::moe_experts_cpu`
    (the graph sees "[T, D] in, [T, D] out"), except at the ends. For so few tokens that at most a
    quarter of the experts can be chosen (mini: 1 token) `moe.experts_gathered`, which Inductor
    fuses into the graph's own loops, saves the op's call (~10 us in Python and ctypes; whole
    mini decode graphs, bench/cpu_graph_ops.py, kernel vs gathered: 1.06x slower at 1 token,
    1.11x faster at 4, 1.26x at 16). For over 32 pairs per expert, where the kernel's dot
    products are compute-bound, torch's grouped GEMM (bench/cpu_experts.py, mini: the kernel
    1.04x faster at 32 pairs per expert, 1.32x slower at 64). The choice is by static shape, so
    each bucket's graph holds one. Unquantized weights only."""
    moe._require_unquantized(scales, "moe_cpu.experts")
    pairs, n_experts = x.shape[0] * expert_ids.shape[1], gate_proj.shape[0]
    args = (x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, scales, first_expert, linear)
    if torch.compiler.is_compiling() and pairs <= GATHERED_MAX_PAIRS_PER_EXPERT * n_experts:
        return moe.experts_gathered(*args)
    if pairs > KERNEL_MAX_PAIRS_PER_EXPERT * n_experts:
        return moe.experts_grouped_mm(*args)
    return torch.ops.glm5c.moe_experts_cpu(x, expert_ids, expert_weights.float(), gate_proj, up_proj, down_proj,
                                           first_expert)  # fmt: skip
