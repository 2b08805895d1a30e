"""Triton FP8 kernels: per-token activation quantization and the block-scaled FP8 GEMM.

They compute what `fp8.quantize_act_groups` and `fp8.fp8_linear` define (the format is described
there): activations in groups of 128 along K with fp32 scales amax / 448, weights in 128x128
blocks, fp32 accumulation, and each 128-wide K block's partial product scaled by
`a_scale[m, kb] * b_scale[n // 128, kb]` before it joins the accumulator.

Design
------
- Quantization: one program per (token, 4 groups of 128). Division by the scale is `div_rn`
  (IEEE, as torch) and the rounding to e4m3 is done in fp32 by `round_to_e4m3`, so the fp8 bytes
  are bit-identical to the torch reference on a GPU and under the interpreter (whose own fp8
  cast halves values that round up into the next binade).
- GEMM: output tiles BLOCK_M x BLOCK_N, BLOCK_K = 128 (one scale group per K step), an fp8 x
  fp8 `tl.dot` per K step (wgmma on Hopper; Triton lets wgmma accumulate imprecisely, but only
  over those 128, as DeepGEMM's promotion interval) rescaled into an fp32 accumulator. Rows and
  columns past M / N load clamped indices (no masks in the loop) and are not stored; a K that is
  not a multiple of 128 masks its last block (EVEN_K specializes the mask away), so every shape
  runs through the kernel, including the tiny test model's (dims below 128).
  Programs walk GROUP_M row tiles per column band (L2 reuse of weight tiles at prefill).
- Autotuning (GPU only) is keyed on a power-of-two bucket of M plus N, K: small M gets BLOCK_M 16
  and narrow N tiles (more programs to stream weights from all SMs), large M 64/128 x 128 tiles.
  Under the interpreter one fixed config runs.

Expected on an H200 (not yet measured): decode (M <= 16) is weight streaming, ~60-75% of the
4.3 TB/s with 4-6 pipeline stages; prefill is compute bound, ~450-650 TFLOP/s (30-40% of the
~1580 dense FP8 peak): every K step waits for its wgmma to rescale on CUDA cores, which Triton
does not overlap the way DeepGEMM / CUTLASS warp-specialized kernels do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fp8

BLOCK_K = 128  # == fp8.ACT_GROUP == fp8.WEIGHT_BLOCK: one scale per K step
INTERPRET = triton.knobs.runtime.interpret  # read when the kernels below are decorated
_GROUPS_PER_PROGRAM = 4


@triton.jit
def round_to_e4m3(v):
    """fp32 -> the nearest float8_e4m3fn value (ties to even, saturating at +-448), still fp32.

    The later cast to fp8 is then exact."""
    bits = v.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    a = tl.minimum(magnitude.to(tl.float32, bitcast=True), 448.0)  # |v|, saturated
    exponent = (a.to(tl.int32, bitcast=True) >> 23) - 127  # floor(log2 |a|)
    # e4m3fn keeps 3 mantissa bits; below 2^-6 the step stays 2^-9 (subnormals)
    step_exp = tl.maximum(exponent, -6) - 3
    step = ((step_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - step_exp) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding then subtracting it rounds to an integer, ties to even
    rounded = ((a * inv_step + magic) - magic) * step
    return (rounded.to(tl.int32, bitcast=True) | (bits ^ magnitude)).to(tl.float32, bitcast=True)  # sign back


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, K, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    k = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    mask = k < K
    x = tl.load(x_ptr + row * K + k, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 448.0), 1.1754943508222875e-38)  # [GROUPS]
    q = round_to_e4m3(tl.math.div_rn(x, scale[:, None]))
    tl.store(q_ptr + row * K + k, q.to(q_ptr.dtype.element_ty), mask=mask)
    n_groups = tl.cdiv(K, GROUP)
    tl.store(s_ptr + row * n_groups + g, scale, mask=g < n_groups)


def quantize_act(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x_fp8 [M, K] float8_e4m3fn, scale [M, ceil(K/128)] fp32); as
    fp8.quantize_act_groups, bit for bit."""
    if x.dim() != 2:
        raise ValueError(f"quantize_act expects [M, K], got shape {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    n_groups = triton.cdiv(k, fp8.ACT_GROUP)
    q = torch.empty(m, k, dtype=fp8.FP8_DTYPE, device=x.device)
    s = torch.empty(m, n_groups, dtype=torch.float32, device=x.device)
    if m:
        grid = (m, triton.cdiv(n_groups, _GROUPS_PER_PROGRAM))
        _quantize_kernel[grid](x, q, s, k, GROUPS=_GROUPS_PER_PROGRAM, GROUP=fp8.ACT_GROUP)
    return q, s


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr,  # [M, K] fp8, [M, ceil(K/128)] fp32
    b_ptr, b_scale_ptr,  # [N, K] fp8, [ceil(N/128), ceil(K/128)] fp32
    c_ptr,  # [M, N]
    M, N, K, M_BUCKET,  # M_BUCKET: only the autotuning key
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rows_in = tl.minimum(rows, M - 1).to(tl.int64)  # clamped: loads need no mask
    cols_in = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kb_count = tl.cdiv(K, BLOCK_K)
    a_ptrs = a_ptr + rows_in[:, None] * K + ks[None, :]  # [BM, BK]
    b_ptrs = b_ptr + cols_in[None, :] * K + ks[:, None]  # [BK, BN]
    a_scale_ptrs = a_scale_ptr + rows_in * kb_count  # [BM]
    b_scale_ptrs = b_scale_ptr + (cols_in // BLOCK_K) * kb_count  # [BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, kb_count):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ks[None, :] < K - kb * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < K - kb * BLOCK_K, other=0.0)
        scale = tl.load(a_scale_ptrs + kb)[:, None] * tl.load(b_scale_ptrs + kb)[None, :]  # [BM, BN]
        acc += tl.dot(a, b) * scale
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _gemm_configs() -> list[triton.Config]:
    shapes = [  # (BLOCK_M, BLOCK_N, warps, stages)
        (16, 32, 4, 6), (16, 64, 4, 5), (16, 128, 4, 4), (32, 64, 4, 5),
        (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3),
    ]  # fmt: skip
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]


def _prune_by_m(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """Keep tiles that fit the token count: BLOCK_M <= max(bucket, 64) (64 rows is wgmma's
    height, 16 runs mma.sync on fp8 widened to fp16: the tuner picks), and >= 64 from M = 512."""
    bucket = named_args["M_BUCKET"]
    return [c for c in configs if max(bucket, 64) >= c.kwargs["BLOCK_M"] >= min(bucket, 512) // 8]


_fp8_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_by_m}
)(_fp8_gemm_kernel)
_INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 4}


def m_bucket(m: int) -> int:
    """Autotuning key for a row count: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(m))


def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(a [M, K] fp8, a_scale [M, ceil(K/128)]) @ (b [N, K] fp8, b_scale [ceil(N/128), ceil(K/128)]).T
    -> [M, N] in out_dtype, accumulated in fp32."""
    m, k = a.shape
    n = b.shape[0]
    kb = triton.cdiv(k, BLOCK_K)
    if b.shape[1] != k or a_scale.shape != (m, kb) or b_scale.shape != (triton.cdiv(n, BLOCK_K), kb):
        raise ValueError(
            f"fp8_gemm: shapes do not fit: a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)}, "
            f"b {tuple(b.shape)}, b_scale {tuple(b_scale.shape)} (scales per 128 along K, 128x128 for b)"
        )
    a, a_scale, b, b_scale = (t.contiguous() for t in (a, a_scale, b, b_scale))
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    args = (a, a_scale, b, b_scale, c, m, n, k, m_bucket(m))
    if INTERPRET:
        cfg = _INTERPRET_GEMM
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_gemm_kernel[grid](*args, BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0, **cfg)
    else:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _fp8_gemm_tuned[grid](*args, BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0)
    return c


def linear(x: Tensor, weight: Tensor, scale_inv: Tensor | None = None) -> Tensor:
    """Ops.linear: y = x @ weight.T. An FP8 weight (with its 128x128 block scales) runs as
    quantize_act + fp8_gemm for any shape; a plain weight runs linear_ref."""
    if scale_inv is None:
        from . import linear_ref

        return linear_ref(x, weight)
    if weight.dtype != fp8.FP8_DTYPE or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x {tuple(x.shape)} does not fit an fp8 weight [N, K]; got {tuple(weight.shape)} {weight.dtype}"
        )
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    y = fp8_gemm(*quantize_act(x2), weight, scale_inv, x.dtype)  # [M, N]
    return y.view(*x.shape[:-1], weight.shape[0])
