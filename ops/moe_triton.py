"""Triton MoE experts: grouped GEMMs over `moe.group_by_expert`'s layout, FP8 block-scaled or plain.

`experts` computes what `moe.experts_ref` defines, in four launches whose shapes depend only on
the token count T (no host sync, so the step can be captured in a CUDA graph):

  1. quantize_act(x)                       x [T, D] -> fp8 [T, D] + scales [T, D/128]   (FP8 only)
  2. _gate_up_kernel  (gate and up fused)  h = silu(x W_g^T) * (x W_u^T)  [P, I], P = T * top_k
     rows in expert-sorted order, gathered from x by `order // top_k`; for FP8 the epilogue also
     quantizes h per row in groups of 128 (each program's N tile is exactly one group)
  3. _down_kernel                          y = h W_d^T  [P, D], stored at each pair's own row t*k+j
  4. _combine_kernel                       out[t] = sum_j w[t, j] * y[t*k+j] over local experts

Schedule. Row tiles are laid out expert after expert, each expert's rows padded to whole tiles
*in the indexing*: a program reads `group_ends` (cumulative rows per local expert) on the
device, finds which expert its row-tile index falls in (`_tile_of`, one cumsum over <= 256
experts) and exits if it is past the last tile. Every expert with n rows takes ceil(n / BLOCK_M)
tiles, so the tiles needed are at most floor(P / BLOCK_M) + min(E, P) and the grid is
(ceil(P / BLOCK_M) + min(E, P)) x N tiles: shape-static, with at most min(E, P) + 1 idle row
programs per N tile, which exit at once (a grid per (row tile, N tile, expert) would launch
E * ceil(P / BLOCK_M) row programs, nearly all idle at prefill; a persistent schedule would save
the idle launches but adds a tile queue for no gain at these sizes). Experts with no rows are
never touched, so decode reads only the active experts' weights. Row tiles vary fastest, so
the tiles of one expert sharing a weight tile run together (L2 reuse at prefill).

Combine is a separate, deterministic gather-sum (no atomics): each (token, slot) pair has its own
row of y, and pairs routed to other ranks are masked out by their expert id.

Expected on an H200 (not yet measured). Decode (T = 1..64): weight streaming; gate/up gives
(active experts) x ceil(I / 128) programs (8 x 16 = 128 for one token at GLM-5 sizes, about one
per SM) and down 8 x 48, so ~55-70% of 4.3 TB/s is the aim, limited by one wave of long K loops.
Prefill (T >= 512): 64/128-row tiles, ~400-600 TFLOP/s FP8 (below the dense GEMM's because of
ragged last tiles per expert and the two accumulators of the fused gate/up).
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fp8, moe
from .fp8_triton import BLOCK_K, INTERPRET, m_bucket, quantize_act, round_to_e4m3


@triton.jit
def _tile_of(pid_m, group_ends_ptr, n_local, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row tile pid_m -> (local expert, first row, end of the expert's rows); expert >= n_local
    when pid_m is past the last tile."""
    e = tl.arange(0, E_POW2)
    ends = tl.load(group_ends_ptr + e, mask=e < n_local, other=0)  # [E_POW2]
    starts = tl.load(group_ends_ptr + e - 1, mask=(e >= 1) & (e < n_local), other=0)
    tiles = tl.cdiv(ends - starts, BLOCK_M)  # 0 past n_local
    tile_ends = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return expert, row0, tl.sum(tl.where(mine, ends, 0), 0)


_EVEN_K = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}


@triton.heuristics(_EVEN_K)
@triton.jit
def _gate_up_kernel(
    x_ptr, x_scale_ptr,  # [T, D] (fp8, + [T, ceil(D/128)] fp32 scales) or plain
    order_ptr, group_ends_ptr, n_local,  # [P] sorted pair -> pair index t*k+j; [n_local] int32
    wg_ptr, wu_ptr, wg_scale_ptr, wu_scale_ptr,  # [E, I, D] each (+ [E, ceil(I/128), ceil(D/128)])
    h_ptr, h_scale_ptr,  # [P, I] (fp8, + [P, ceil(I/128)]) or plain, rows in sorted order
    N, K, P_BUCKET,  # N = I, K = D; P_BUCKET: only the autotuning key
    TOP_K: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    expert, row0, row_end = _tile_of(tl.program_id(0), group_ends_ptr, n_local, BLOCK_M, E_POW2)
    if expert >= n_local:
        return
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM] sorted rows
    row_ok = rows < row_end
    token = (tl.load(order_ptr + rows, mask=row_ok, other=0) // TOP_K).to(tl.int64)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] within N = I
    cols_in = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kb_count = tl.cdiv(K, BLOCK_K)
    w_off = expert.to(tl.int64) * N * K + cols_in[None, :] * K + ks[:, None]  # [BK, BN]
    x_ptrs = x_ptr + token[:, None] * K + ks[None, :]  # [BM, BK]
    wg_ptrs, wu_ptrs = wg_ptr + w_off, wu_ptr + w_off
    s_off = (expert * tl.cdiv(N, BLOCK_K) + cols_in // BLOCK_K) * kb_count  # [BN] (FP8 only)

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, kb_count):
        if EVEN_K:
            a = tl.load(x_ptrs)
            bg = tl.load(wg_ptrs)
            bu = tl.load(wu_ptrs)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(x_ptrs, mask=ks[None, :] < k_left, other=0.0)
            bg = tl.load(wg_ptrs, mask=ks[:, None] < k_left, other=0.0)
            bu = tl.load(wu_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if FP8:
            a_scale = tl.load(x_scale_ptr + token * kb_count + kb)[:, None]  # [BM, 1]
            acc_g += tl.dot(a, bg) * (a_scale * tl.load(wg_scale_ptr + s_off + kb)[None, :])
            acc_u += tl.dot(a, bu) * (a_scale * tl.load(wu_scale_ptr + s_off + kb)[None, :])
        else:
            acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K

    h = acc_g * tl.sigmoid(acc_g) * acc_u  # [BM, BN] silu(gate) * up, fp32
    h = tl.where(cols[None, :] < N, h, 0.0)  # clamped columns repeat column N-1: drop them
    out_mask = row_ok[:, None] & (cols[None, :] < N)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    if FP8:
        tl.static_assert(BLOCK_N == BLOCK_K, "the FP8 epilogue quantizes one 128-column group per tile")
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(h), axis=1), 448.0), 1.1754943508222875e-38)  # [BM]
        q = round_to_e4m3(tl.math.div_rn(h, scale[:, None]))
        tl.store(h_ptrs, q.to(h_ptr.dtype.element_ty), mask=out_mask)
        tl.store(h_scale_ptr + rows.to(tl.int64) * tl.cdiv(N, BLOCK_K) + tl.program_id(1), scale, mask=row_ok)
    else:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.heuristics(_EVEN_K)
@triton.jit
def _down_kernel(
    h_ptr, h_scale_ptr,  # [P, I] sorted rows (fp8, + [P, ceil(I/128)]) or plain
    order_ptr, group_ends_ptr, n_local,
    w_ptr, w_scale_ptr,  # [E, D, I] (+ [E, ceil(D/128), ceil(I/128)])
    y_ptr,  # [P, D], row = pair index t*k+j
    N, K, P_BUCKET,  # N = D, K = I
    FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    expert, row0, row_end = _tile_of(tl.program_id(0), group_ends_ptr, n_local, BLOCK_M, E_POW2)
    if expert >= n_local:
        return
    rows = row0 + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < row_end
    rows_in = tl.minimum(rows, row_end - 1).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] within N = D
    cols_in = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kb_count = tl.cdiv(K, BLOCK_K)
    h_ptrs = h_ptr + rows_in[:, None] * K + ks[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert.to(tl.int64) * N * K + cols_in[None, :] * K + ks[:, None]  # [BK, BN]
    s_off = (expert * tl.cdiv(N, BLOCK_K) + cols_in // BLOCK_K) * kb_count  # [BN] (FP8 only)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, kb_count):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(h_ptrs, mask=ks[None, :] < K - kb * BLOCK_K, other=0.0)
            b = tl.load(w_ptrs, mask=ks[:, None] < K - kb * BLOCK_K, other=0.0)
        if FP8:
            scale = tl.load(h_scale_ptr + rows_in * kb_count + kb)[:, None] * tl.load(w_scale_ptr + s_off + kb)[None, :]
            acc += tl.dot(a, b) * scale
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    pair = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM]
    y_ptrs = y_ptr + pair[:, None] * N + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit
def _combine_kernel(
    y_ptr, row_of_pair_ptr, ids_ptr, w_ptr, out_ptr,  # y [P, D]; row_of_pair [P]; ids, w [T, k]; out [T, D]
    first_expert, n_local, D, TOP_K: tl.constexpr, BLOCK_D: tl.constexpr, ROW_MAP: tl.constexpr,
):  # fmt: skip
    """out[t] = sum_j w[t, j] * y[row of pair t*k + j] over the token's local experts (no atomics);
    the row is the pair index itself, or row_of_pair[pair] when ROW_MAP (y in sorted order)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        local = tl.load(ids_ptr + t * TOP_K + j) - first_expert
        width = tl.where((local >= 0) & (local < n_local), D, 0)  # other ranks' pairs have no row of y
        row = t * TOP_K + j
        if ROW_MAP:
            row = tl.load(row_of_pair_ptr + row).to(tl.int64)
        y = tl.load(y_ptr + row * D + cols, mask=cols < width, other=0.0)
        acc += tl.load(w_ptr + t * TOP_K + j) * y.to(tl.float32)
    tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def combine(
    y: Tensor, expert_ids: Tensor, expert_weights: Tensor, first_expert: int, n_local: int, out: Tensor,
    row_of_pair: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """out [T, D] = each token's weighted sum of its local experts' rows of y [P, D] (rows in pair
    order, or where row_of_pair [P] says)."""
    t, top_k = expert_ids.shape
    d = out.shape[1]
    _combine_kernel[(t, triton.cdiv(d, _COMBINE_BLOCK_D))](
        y, y if row_of_pair is None else row_of_pair, expert_ids.contiguous(), expert_weights.float().contiguous(),
        out, first_expert, n_local, d, TOP_K=top_k, BLOCK_D=_COMBINE_BLOCK_D, ROW_MAP=row_of_pair is not None,
    )  # fmt: skip
    return out


def _configs(fp8_weights: bool, gate_up: bool) -> list[triton.Config]:
    """GPU autotuning space. FP8: BLOCK_K 128 (the scale group), gate/up BLOCK_N 128 (its epilogue
    quantizes whole groups). Plain (bf16) weights: BLOCK_K 64 to keep stages in shared memory."""
    bk = BLOCK_K if fp8_weights else 64
    bns = (128,) if fp8_weights and gate_up else (64, 128)
    shapes = [(16, 4, 5), (16, 4, 4), (32, 4, 4), (64, 4, 4), (64, 8, 3), (128, 8, 3), (128, 4, 3)]  # BM, warps, stages
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, w, s in shapes
        for bn in bns
        if not (gate_up and bm == 128 and bn == 128 and w == 4)  # two 128x128 fp32 accumulators: 8 warps
    ]


def _prune_by_rows(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """Row tiles no taller than max(64, mean rows per active expert) (P / min(E, P), to a power
    of two; 64 rows is wgmma's height, below it mma.sync runs), and at least 64 tall once that
    mean reaches 256."""
    p, n_local = named_args["P_BUCKET"], named_args["n_local"]
    per_expert = m_bucket(p // max(1, min(n_local, p)))
    return [c for c in configs if max(per_expert, 64) >= c.kwargs["BLOCK_M"] >= min(per_expert, 256) // 4]


def _tuned(kernel, fp8_weights: bool, gate_up: bool):
    return triton.autotune(
        configs=_configs(fp8_weights, gate_up),
        key=["P_BUCKET", "n_local", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_by_rows},
    )(kernel)


_TUNED = {
    (fp8_weights, gate_up): _tuned(_gate_up_kernel if gate_up else _down_kernel, fp8_weights, gate_up)
    for fp8_weights in (True, False)
    for gate_up in (True, False)
}
_INTERPRET_CONFIG = {
    True: {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": BLOCK_K},  # FP8
    False: {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
}
_COMBINE_BLOCK_D = 512


def _grouped_gemm(gate_up: bool, fp8_weights: bool, p: int, n_local: int, args: tuple, **const) -> None:
    """Launch the gate/up or down kernel for P pairs over (row tiles, N tiles); args end with
    (N, K, P_BUCKET). Tuned on a GPU; one small config under the interpreter."""
    n = args[-3]

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(p, meta["BLOCK_M"]) + min(n_local, p), triton.cdiv(n, meta["BLOCK_N"]))

    const.update(E_POW2=max(2, triton.next_power_of_2(n_local)), FP8=fp8_weights)
    if INTERPRET:
        kernel, cfg = (_gate_up_kernel if gate_up else _down_kernel), _INTERPRET_CONFIG[fp8_weights]
        kernel[grid(cfg)](*args, **const, **cfg)
    else:
        _TUNED[(fp8_weights, gate_up)][grid](*args, **const)


def experts(
    x: Tensor,  # [T, D]
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D]
    up_proj: Tensor,  # [E_local, I, D]
    down_proj: Tensor,  # [E_local, D, I]
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],  # FP8 block scales per stack, or None
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """Ops.experts with Triton grouped GEMMs -> [T, D]. FP8 stacks (all three scaled) run the
    block-scaled kernels; plain stacks of x's dtype run the same kernels unquantized. The GEMMs
    are the kernels' own, so `linear` is not called."""
    t, d = x.shape
    top_k = expert_ids.shape[1]
    n_local, i, _ = gate_proj.shape
    fp8_weights = all(s is not None for s in scales)
    if not fp8_weights and any(s is not None for s in scales):
        raise ValueError("experts: either all three expert stacks are FP8 (with scales) or none is")
    want = fp8.FP8_DTYPE if fp8_weights else x.dtype
    if any(w.dtype != want for w in (gate_proj, up_proj, down_proj)):
        raise ValueError(f"experts: expert weights must be {want} here, got {gate_proj.dtype}")
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    p = t * top_k
    order, group_ends, _ = moe.group_by_expert(expert_ids, first_expert, n_local)  # [P], [n_local]
    gate_proj, up_proj, down_proj = (w.contiguous() for w in (gate_proj, up_proj, down_proj))
    if fp8_weights:
        xa, x_scale = quantize_act(x)  # [T, D] fp8, [T, ceil(D/128)]
        h = torch.empty(p, i, dtype=fp8.FP8_DTYPE, device=x.device)  # [P, I]
        h_scale = torch.empty(p, triton.cdiv(i, BLOCK_K), dtype=torch.float32, device=x.device)
        gate_s, up_s, down_s = (s.contiguous() for s in scales)
    else:  # the scale arguments are not read: any tensor will do
        xa = x_scale = x.contiguous()
        h = torch.empty(p, i, dtype=x.dtype, device=x.device)  # [P, I]
        h_scale = gate_s = up_s = down_s = xa
    const = {"DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}  # fp32: exact, as F.linear
    bucket = m_bucket(p)
    _grouped_gemm(
        True, fp8_weights, p, n_local,
        (xa, x_scale, order, group_ends, n_local, gate_proj, up_proj, gate_s, up_s, h, h_scale, i, d, bucket),
        TOP_K=top_k, **const,
    )  # fmt: skip
    y = torch.empty(p, d, dtype=x.dtype, device=x.device)  # [P, D] in pair order
    down_args = (h, h_scale, order, group_ends, n_local, down_proj, down_s, y, d, i, bucket)
    _grouped_gemm(False, fp8_weights, p, n_local, down_args, **const)
    return combine(y, expert_ids, expert_weights, first_expert, n_local, out)
