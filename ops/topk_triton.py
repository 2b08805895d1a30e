"""Row top-k over a causal prefix, in Triton: a multi-CTA radix select with static shapes.

For each row t of scores [T, S], the candidates are the columns s <= positions[t] (and s < S):
the output [T, k] int32 holds the columns of the k best candidates, -1 in the slots left empty
when a row has fewer than k candidates. Order within a row is unspecified; among candidates
tied with the k-th best score, which ones are kept is unspecified too.

Why not torch.topk on the score buffer: it would be correct and shape-static, but for k = 2048
over 128K-wide rows its speed is whatever PyTorch's generic top-k does, and DSA's budget is the
sparse attention it feeds; the serving engines replaced it for DeepSeek-V3.2 with radix-select
kernels (vLLM's csrc/sampler.cu, SGLang's fast_topk_v2). bench/dsa_kernels.py times torch.topk
beside this kernel on the same scores. This one reads each row a few times from L2 with many SMs
busy, even for a single 128K row (32 programs of 4096 columns), and needs no host sync:

    1. the scores map to uint32 keys with the same order (sign flip / bit inversion);
    2. three histogram rounds (10, 11 and 11 bits of the key, most significant first): each
       program counts the digits of its chunk among the keys that match the digits chosen so
       far and adds its histogram to the row's with atomics; every program of the next round
       re-derives the chosen digits from the finished histograms (a 2048-bin scan, cheap);
    3. after three rounds the k-th best key `tau` is known exactly, with how many keys equal to
       it must be kept; a gather pass writes the keys > tau, and as many keys == tau as fit,
       into the output through two per-row atomic counters.
Rows with no more than k candidates skip the rounds and copy their columns in order.

Launches per call: one workspace memset, three histogram rounds, one gather; grids depend only
on (T, S), so a CUDA graph captures them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

NUM_BINS: tl.constexpr = tl.constexpr(2048)  # 11-bit digits (the first round uses 10 bits)
ROUNDS: tl.constexpr = tl.constexpr(3)
_WORKSPACE = 3 * 2048 + 2  # per row: one histogram per round, then the two gather counters
CHUNK = 4096  # columns per program
BLOCK = 1024  # columns per step inside a program


@triton.jit
def _ordered_key(x):
    """fp32 -> uint32 whose unsigned order is x's order (larger score, larger key)."""
    u = x.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) != 0, ~u, u | 0x80000000)


@triton.jit
def _radix_state(ws_row, k, ROUNDS_DONE: tl.constexpr):
    """Digits chosen in the first ROUNDS_DONE rounds (as a key prefix) and how many of the k best
    keys still lie among the keys with that prefix."""
    bins = tl.arange(0, NUM_BINS)
    prefix = tl.full([], 0, tl.uint32)
    k_rem = k
    for r in tl.static_range(ROUNDS_DONE):
        hist = tl.load(ws_row + r * NUM_BINS + bins)  # [NUM_BINS] int32
        at_or_above = tl.cumsum(hist, axis=0, reverse=True)  # keys in bins >= b
        b = tl.max(tl.where(at_or_above >= k_rem, bins, -1), axis=0)
        k_rem -= tl.sum(tl.where(bins > b, hist, 0), axis=0)
        prefix = (prefix << 11) | b.to(tl.uint32)
    return prefix, k_rem


@triton.jit
def _radix_hist_kernel(
    scores_ptr, pos_ptr, ws_ptr, S, K, stride_s, ws_stride,
    ROUND: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    lo = tl.program_id(1) * CHUNK
    n = tl.minimum(tl.load(pos_ptr + row) + 1, S)  # candidates of this row
    if (n > K) & (lo < n):
        SHIFT: tl.constexpr = 22 - 11 * ROUND  # digit bits [SHIFT, SHIFT + width)
        ws_row = ws_ptr + row.to(tl.int64) * ws_stride
        prefix, _ = _radix_state(ws_row, K, ROUND)
        counts = tl.zeros([NUM_BINS], tl.int32)
        for s0 in range(lo, tl.minimum(lo + CHUNK, n), BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            ok = offs < n
            key = _ordered_key(tl.load(scores_ptr + row.to(tl.int64) * stride_s + offs, mask=ok, other=0.0))
            if ROUND > 0:
                ok = ok & ((key >> (SHIFT + 11)) == prefix)
            counts += tl.histogram(((key >> SHIFT) & 2047).to(tl.int32), NUM_BINS, mask=ok)
        bins = tl.arange(0, NUM_BINS)
        tl.atomic_add(ws_row + ROUND * NUM_BINS + bins, counts, mask=counts > 0)


@triton.jit
def _radix_gather_kernel(
    scores_ptr, pos_ptr, ws_ptr, out_ptr, S, K, stride_s, ws_stride, stride_o,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    c = tl.program_id(1)
    lo = c * CHUNK
    n = tl.minimum(tl.load(pos_ptr + row) + 1, S)
    out_row = out_ptr + row.to(tl.int64) * stride_o
    if c == 0:  # slots past the min(n, K) selected columns stay empty
        for j0 in range(tl.minimum(n, K), K, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            tl.store(out_row + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < K)
    if n <= K:  # every candidate is selected, in column order
        for s0 in range(lo, tl.minimum(lo + CHUNK, n), BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            tl.store(out_row + offs, offs, mask=offs < n)
    elif lo < n:
        ws_row = ws_ptr + row.to(tl.int64) * ws_stride
        tau, ties = _radix_state(ws_row, K, ROUNDS)  # the k-th best key; keys == tau to keep
        for s0 in range(lo, tl.minimum(lo + CHUNK, n), BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            ok = offs < n
            key = _ordered_key(tl.load(scores_ptr + row.to(tl.int64) * stride_s + offs, mask=ok, other=0.0))
            above = (ok & (key > tau)).to(tl.int32)
            n_above = tl.sum(above, axis=0)
            if n_above > 0:  # slots [0, K - ties) hold the keys above tau
                rank = tl.atomic_add(ws_row + ROUNDS * NUM_BINS, n_above) + tl.cumsum(above, axis=0) - 1
                tl.store(out_row + rank, offs, mask=above != 0)
            tied = (ok & (key == tau)).to(tl.int32)
            n_tied = tl.sum(tied, axis=0)
            if n_tied > 0:  # slots [K - ties, K) hold the first `ties` keys equal to tau
                rank = tl.atomic_add(ws_row + ROUNDS * NUM_BINS + 1, n_tied) + tl.cumsum(tied, axis=0) - 1
                tl.store(out_row + (K - ties) + rank, offs, mask=(tied != 0) & (rank < ties))


def topk_prefix(
    scores: Tensor, positions: Tensor, k: int, out: Tensor | None = None, chunk: int = CHUNK, block: int = BLOCK
) -> Tensor:
    """scores [T, S] fp32, positions [T] -> [T, k] int32: per row, the columns of the k best scores
    among columns <= positions[t], -1 in empty slots. `out` [T, k] int32 may be given (e.g. a view);
    `chunk` (columns per program) and `block` (columns per step, dividing chunk) are tuning knobs."""
    num_rows, width = scores.shape
    if scores.dtype != torch.float32 or scores.stride(1) != 1:
        raise ValueError("topk_prefix needs fp32 scores with contiguous rows")
    if out is None:
        out = torch.empty(num_rows, k, dtype=torch.int32, device=scores.device)
    if num_rows == 0:
        return out
    ws = torch.zeros(num_rows, _WORKSPACE, dtype=torch.int32, device=scores.device)
    grid = (num_rows, triton.cdiv(width, chunk))
    for rnd in range(3):
        _radix_hist_kernel[grid](
            scores, positions, ws, width, k, scores.stride(0), _WORKSPACE, ROUND=rnd, CHUNK=chunk, BLOCK=block
        )
    _radix_gather_kernel[grid](
        scores, positions, ws, out, width, k, scores.stride(0), _WORKSPACE, out.stride(0), CHUNK=chunk, BLOCK=block
    )
    return out
