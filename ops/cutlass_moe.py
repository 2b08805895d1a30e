"""MoE experts on CUTLASS's SM90 FP8 grouped GEMM (ops/cutlass/grouped_gemm_fp8.cu).

`experts` computes what `moe.experts_ref` defines for FP8 expert stacks (GLM-5-FP8: e4m3
weights with 128x128 block scales), beside the Triton path (ops/moe_triton.py), over the same
shape-static layout (`moe.group_by_expert`: pairs sorted by local expert, `group_ends` on the
device). Every shape depends only on the token count T and nothing waits for the device, so a
step with it can be captured in a CUDA graph:

  1. quantize_act(x)                          x [T, D] -> fp8 [T, D] + scales [T, D/128] (Triton)
  2. gather rows in sorted order              xs [P, D] fp8 + [P, D/128], P = T * top_k
  3. CUTLASS grouped GEMM, gate and up in one launch (two weight stacks, 2E groups)
                                              gu [P, 2I] bf16 = [xs W_g^T | xs W_u^T] per expert
  4. _swiglu_quant_kernel                     h = silu(gate) * up [P, I] -> fp8 + [P, I/128] (Triton)
  5. CUTLASS grouped GEMM, down               y [P, D] bf16, rows in sorted order
  6. moe_triton.combine                      out[t] = sum_j w[t, j] * y[row of pair (t, j)] (Triton)

Rows past group_ends[-1] (pairs routed to other ranks) are never written by the GEMMs and are
masked out by the combine. The gate/up product is rounded to bf16 before SwiGLU, as vLLM's and
DeepSeek's FP8 inference do (the Triton path and experts_ref keep fp32 there): near a rounding
tie an fp8 byte of h then flips, so the output differs from experts_ref by 1-1.5e-2 of its norm
(measured; 3.8e-2 with a single token), as experts_ref itself computed with that rounding does.

The library is built ahead of time (`python -m glm5c.ops.cutlass.build`); this module only
loads it with ctypes, on first use, and raises `CutlassNotBuilt` with that
instruction when it is absent. It never builds on a request path. On CPU tensors the GEMM op
runs its torch reference (`grouped_gemm_fp8_ref`), so the rest of the path is testable on a
CPU (under Triton's interpreter).

Kernel configurations (`config`): "tile128x128" (cooperative 128x128x128 tiles of tokens x
weight rows, cluster 1x2x1: prefill), "swapab128x32" (the product transposed, 128 weight rows x
32 tokens per tile: decode, where an expert has a few rows), or "auto" (`choose_config`:
swapab while an active expert averages <= 32 rows). Which of them, or the Triton path, wins per
token bucket is measured by bench/moe_kernels.py --cutlass; `glm5c compile` is to record it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fp8, moe
from .cutlass import build as _build
from .fp8_triton import quantize_act, round_to_e4m3
from .moe_triton import combine

ABI_VERSION = 1
CONFIGS = {"tile128x128": 0, "swapab128x32": 1}
SWAP_AB_MAX_ROWS = 32  # "auto": swapab while the mean rows per active expert is at most its tile width
ALIGN_K, ALIGN_N = 16, 8  # the kernel's alignment needs (TMA: 16-byte row strides)
LIB_ENV = "GLM5C_CUTLASS_LIB"


class CutlassNotBuilt(RuntimeError):
    """The CUTLASS library was not built ahead of time (or not where it is looked for)."""


class CutlassError(RuntimeError):
    """The CUTLASS entry point returned an error code."""


_lib: ctypes.CDLL | None = None


def library_path() -> Path | None:
    """$GLM5C_CUTLASS_LIB, else the newest cached build of the current source and flags."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    return _build.find_built("grouped_gemm_fp8")


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load the grouped-GEMM library (once per process unless `path` is given). Loading needs no
    GPU: the library links the CUDA runtime statically and finds the driver only when launched."""
    global _lib
    if path is None and _lib is not None:
        return _lib
    where = Path(path) if path is not None else library_path()
    if where is None or not where.is_file():
        looked = f"{where}" if where is not None else f"the kernel cache {_build.cache_dir()}"
        raise CutlassNotBuilt(
            f"the CUTLASS grouped-GEMM library is not built (looked in {looked}): build it ahead of time with "
            "`python -m glm5c.ops.cutlass.build` (needs nvcc and the `cutlass` extra, ~1 minute), "
            f"or point ${LIB_ENV} at a built .so"
        )
    lib = ctypes.CDLL(str(where))
    c_int, c_void, c_size = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    lib.glm5c_gg_fp8_abi_version.restype = c_int
    lib.glm5c_gg_fp8_error_string.restype = ctypes.c_char_p
    lib.glm5c_gg_fp8_error_string.argtypes = [c_int]
    lib.glm5c_gg_fp8_last_error.restype = ctypes.c_char_p
    lib.glm5c_gg_fp8_config_name.restype = ctypes.c_char_p
    lib.glm5c_gg_fp8_config_name.argtypes = [c_int]
    lib.glm5c_gg_fp8_shared_bytes.restype = c_int
    lib.glm5c_gg_fp8_shared_bytes.argtypes = [c_int]
    lib.glm5c_gg_fp8_workspace_size.restype = c_int
    lib.glm5c_gg_fp8_workspace_size.argtypes = [c_int, c_int, c_int, ctypes.POINTER(c_size)]
    lib.glm5c_gg_fp8_run.restype = c_int
    lib.glm5c_gg_fp8_run.argtypes = [
        c_int, c_void, c_void, c_void, c_void, c_void, c_void, c_void,  # config, a, a_scale, b0, s0, b1, s1, ends
        c_int, c_int, c_int, c_void, ctypes.c_int64,  # num_experts, n, k, d, ldd
        c_void, c_size, c_int, c_int, c_void,  # workspace, bytes, sm_count, device, stream
    ]  # fmt: skip
    if lib.glm5c_gg_fp8_abi_version() != ABI_VERSION:
        found = lib.glm5c_gg_fp8_abi_version()
        raise CutlassNotBuilt(f"{where} has ABI {found}, this code wants {ABI_VERSION}: rebuild it")
    if path is None:
        _lib = lib
    return lib


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        detail = lib.glm5c_gg_fp8_last_error().decode(errors="replace")
        raise CutlassError(f"{what}: {lib.glm5c_gg_fp8_error_string(rc).decode()} ({rc}): {detail}")


def workspace_size(config: int, num_groups: int, sm_count: int, lib: ctypes.CDLL | None = None) -> int:
    """Device workspace bytes for one launch (host arithmetic: no GPU needed)."""
    lib = lib or load_library()
    out = ctypes.c_size_t(0)
    _check(lib, lib.glm5c_gg_fp8_workspace_size(config, num_groups, sm_count, ctypes.byref(out)), "workspace_size")
    return out.value


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grouped_gemm_fp8_ref(
    a: Tensor, a_scale: Tensor, w0: Tensor, w0_scale: Tensor, w1: Tensor | None, w1_scale: Tensor | None,
    group_ends: Tensor,
) -> Tensor:  # fmt: skip
    """What the CUTLASS op computes, in plain torch (fp32 math on dequantized operands): rows
    [group_ends[e-1], group_ends[e]) of a times expert e of each stack -> [rows, sets * N] bf16;
    rows past group_ends[-1] are zero (the kernel leaves them unwritten)."""
    stacks = [(w0, w0_scale)] + ([(w1, w1_scale)] if w1 is not None else [])
    n = w0.shape[1]
    out = torch.zeros(a.shape[0], len(stacks) * n, dtype=torch.bfloat16, device=a.device)
    act = fp8.dequantize_act_groups(a, a_scale)  # [rows, K] fp32
    start = 0
    for e, end in enumerate(group_ends.tolist()):
        if end > start:
            for s, (w, ws) in enumerate(stacks):
                wd = fp8.dequantize_weight_blocks(w[e], ws[e], torch.float32)  # [N, K]
                out[start:end, s * n : (s + 1) * n] = (act[start:end] @ wd.T).to(torch.bfloat16)
        start = max(start, end)
    return out


def _check_operands(a, a_scale, w0, w0_scale, w1, w1_scale, group_ends) -> None:
    rows, k = a.shape
    e, n, k2 = w0.shape
    kb, nb = triton.cdiv(k, fp8.ACT_GROUP), triton.cdiv(n, fp8.WEIGHT_BLOCK)
    problems = []
    if a.dtype != fp8.FP8_DTYPE or w0.dtype != fp8.FP8_DTYPE or (w1 is not None and w1.dtype != fp8.FP8_DTYPE):
        problems.append("a, w0, w1 must be float8_e4m3fn")
    if k2 != k or tuple(a_scale.shape) != (rows, kb) or tuple(w0_scale.shape) != (e, nb, kb):
        problems.append(f"shapes a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)}, w0 {tuple(w0.shape)}, "
                        f"w0_scale {tuple(w0_scale.shape)}")  # fmt: skip
    if (w1 is None) != (w1_scale is None) or (
        w1 is not None and (w1.shape != w0.shape or w1_scale.shape != w0_scale.shape)
    ):
        problems.append("w1 / w1_scale must both be given, shaped as w0 / w0_scale, or both None")
    if a_scale.dtype != torch.float32 or w0_scale.dtype != torch.float32:
        problems.append("scales must be float32")
    if group_ends.dtype != torch.int32 or tuple(group_ends.shape) != (e,):
        problems.append(f"group_ends must be int32 [{e}], got {group_ends.dtype} {tuple(group_ends.shape)}")
    if k % ALIGN_K or n % ALIGN_N:
        problems.append(f"K ({k}) must be a multiple of {ALIGN_K} and N ({n}) of {ALIGN_N} (TMA alignment)")
    if problems:
        raise ValueError("cutlass_grouped_gemm_fp8: " + "; ".join(problems))


@torch.library.custom_op("glm5c::cutlass_grouped_gemm_fp8", mutates_args=())
def grouped_gemm_fp8(
    a: Tensor, a_scale: Tensor, w0: Tensor, w0_scale: Tensor, w1: Tensor | None, w1_scale: Tensor | None,
    group_ends: Tensor, config: int,
) -> Tensor:  # fmt: skip
    """Grouped FP8 GEMM over expert-sorted rows -> [rows, sets * N] bf16 (sets = 2 with w1).

    a [rows, K] fp8 + a_scale [rows, ceil(K/128)] fp32 (per token, 128 columns); w0, w1
    [E, N, K] fp8 + [E, ceil(N/128), ceil(K/128)] fp32; group_ends int32 [E] cumulative rows.
    CUDA: the CUTLASS kernel `config` (0 / 1, see CONFIGS); CPU: grouped_gemm_fp8_ref."""
    _check_operands(a, a_scale, w0, w0_scale, w1, w1_scale, group_ends)
    if a.device.type != "cuda":
        return grouped_gemm_fp8_ref(a, a_scale, w0, w0_scale, w1, w1_scale, group_ends)
    lib = load_library()
    rows, k = a.shape
    e, n, _ = w0.shape
    sets = 1 if w1 is None else 2
    out = torch.empty(rows, sets * n, dtype=torch.bfloat16, device=a.device)
    if rows == 0:
        return out
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    sm_count = _sm_count(device)
    workspace = torch.empty(workspace_size(config, sets * e, sm_count, lib), dtype=torch.uint8, device=a.device)
    a, a_scale, w0, w0_scale, group_ends = (t.contiguous() for t in (a, a_scale, w0, w0_scale, group_ends))
    if w1 is not None:
        w1, w1_scale = w1.contiguous(), w1_scale.contiguous()
    rc = lib.glm5c_gg_fp8_run(
        config, a.data_ptr(), a_scale.data_ptr(), w0.data_ptr(), w0_scale.data_ptr(),
        w1.data_ptr() if w1 is not None else None, w1_scale.data_ptr() if w1 is not None else None,
        group_ends.data_ptr(), e, n, k, out.data_ptr(), sets * n,
        workspace.data_ptr(), workspace.numel(), sm_count, device, torch.cuda.current_stream(a.device).cuda_stream,
    )  # fmt: skip
    _check(lib, rc, "cutlass grouped GEMM")
    return out


@grouped_gemm_fp8.register_fake
def _(a, a_scale, w0, w0_scale, w1, w1_scale, group_ends, config):
    return a.new_empty(a.shape[0], (1 if w1 is None else 2) * w0.shape[1], dtype=torch.bfloat16)


@triton.jit
def _swiglu_quant_kernel(
    gu_ptr, h_ptr, h_scale_ptr, group_ends_ptr, n_local, I,  # gu [P, 2I] bf16 -> h [P, I] fp8 + [P, ceil(I/128)]
    GROUPS: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """One row x GROUPS groups of 128 columns: h = silu(gate) * up, quantized per group as
    quantize_act does (scale amax / 448, torch's rounding). Rows past the last expert exit."""
    row = tl.program_id(0)
    if row >= tl.load(group_ends_ptr + n_local - 1):
        return
    row = row.to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    mask = cols < I
    gate = tl.load(gu_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up  # 0 where masked
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(h), axis=1), 448.0), 1.1754943508222875e-38)  # [GROUPS]
    q = round_to_e4m3(tl.math.div_rn(h, scale[:, None]))
    tl.store(h_ptr + row * I + cols, q.to(h_ptr.dtype.element_ty), mask=mask)
    n_groups = tl.cdiv(I, GROUP)
    tl.store(h_scale_ptr + row * n_groups + g, scale, mask=g < n_groups)



_SWIGLU_GROUPS = 4


def swiglu_quant(gu: Tensor, group_ends: Tensor) -> tuple[Tensor, Tensor]:
    """gu [P, 2I] (gate | up) -> (h fp8 [P, I], scales [P, ceil(I/128)]); rows past
    group_ends[-1] are left unwritten."""
    p, two_i = gu.shape
    i = two_i // 2
    h = torch.empty(p, i, dtype=fp8.FP8_DTYPE, device=gu.device)
    n_groups = triton.cdiv(i, fp8.ACT_GROUP)
    hs = torch.empty(p, n_groups, dtype=torch.float32, device=gu.device)
    if p:
        grid = (p, triton.cdiv(n_groups, _SWIGLU_GROUPS))
        _swiglu_quant_kernel[grid](gu, h, hs, group_ends, group_ends.shape[0], i, GROUPS=_SWIGLU_GROUPS,
                                   GROUP=fp8.ACT_GROUP)  # fmt: skip
    return h, hs


def choose_config(p: int, n_local: int) -> int:
    """swapab128x32 while the mean rows per active expert (P / min(E, P)) fits its 32-token tile."""
    per_expert = p / max(1, min(n_local, p))
    return CONFIGS["swapab128x32"] if per_expert <= SWAP_AB_MAX_ROWS else CONFIGS["tile128x128"]


def _config_id(config: str | int, p: int, n_local: int) -> int:
    if config == "auto":
        return choose_config(p, n_local)
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown CUTLASS config {config!r}; choose from {sorted(CONFIGS)} or 'auto'")
        return CONFIGS[config]
    if config not in CONFIGS.values():
        raise ValueError(f"unknown CUTLASS config id {config}")
    return int(config)


def experts(
    x: Tensor,  # [T, D]
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D] fp8
    up_proj: Tensor,  # [E_local, I, D] fp8
    down_proj: Tensor,  # [E_local, D, I] fp8
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],  # 128x128 block scales per stack
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    config: str | int = "auto",
) -> Tensor:
    """Ops.experts with CUTLASS FP8 grouped GEMMs -> [T, D] in x.dtype (FP8 stacks only; the
    GEMMs are the kernel's own, so `linear` is not called). D and I must be multiples of 16."""
    if any(s is None for s in scales):
        raise ValueError("cutlass_moe.experts runs FP8 expert stacks only (all three with block scales)")
    if any(w.dtype != fp8.FP8_DTYPE for w in (gate_proj, up_proj, down_proj)):
        raise ValueError(f"cutlass_moe.experts: expert weights must be {fp8.FP8_DTYPE}, got {gate_proj.dtype}")
    t, d = x.shape
    n_local, i, _ = gate_proj.shape
    if d % ALIGN_K or i % ALIGN_K:
        raise ValueError(f"cutlass_moe.experts: hidden ({d}) and moe_intermediate ({i}) must be multiples of {ALIGN_K}")
    top_k = expert_ids.shape[1]
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    p = t * top_k
    cfg = _config_id(config, p, n_local)
    order, group_ends, _ = moe.group_by_expert(expert_ids, first_expert, n_local)  # [P], [n_local] int32
    token = order // top_k  # [P] token of each sorted pair
    xq, xq_scale = quantize_act(x)  # [T, D] fp8, [T, ceil(D/128)]
    xs = xq.view(torch.uint8).index_select(0, token).view(fp8.FP8_DTYPE)  # [P, D] in sorted order
    xs_scale = xq_scale.index_select(0, token)
    gate_s, up_s, down_s = scales
    gu = grouped_gemm_fp8(xs, xs_scale, gate_proj, gate_s, up_proj, up_s, group_ends, cfg)  # [P, 2I]
    h, h_scale = swiglu_quant(gu, group_ends)  # [P, I] fp8
    y = grouped_gemm_fp8(h, h_scale, down_proj, down_s, None, None, group_ends, cfg)  # [P, D] bf16, sorted
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(p, device=x.device))
    return combine(y, expert_ids, expert_weights, first_expert, n_local, out, row_of_pair)
