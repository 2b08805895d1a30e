"""DSA kernels in Triton: indexer key-cache write, indexer scores, top-k, sparse MLA attention.

`indexer_topk` and `sparse_mla` have exactly the signatures of the references in ops/dsa.py, so
    dataclasses.replace(REFERENCE, indexer_topk=dsa_triton.indexer_topk, sparse_mla=dsa_triton.sparse_mla)
runs the model on them. Every kernel reads the paged caches through the block table, takes a
ragged flat batch (prefill chunks, decodes and MTP drafts mixed), works for any head count and
for widths that are not powers of two (next-power-of-two aranges with masks), and launches grids
that depend only on tensor shapes, so a CUDA graph captures them. On CPU tensors the kernels run
under Triton's interpreter (TRITON_INTERPRET=1), where they compute in fp32 (its bf16 math is wrong).

Design, and what to expect on an H200 (~4.3 TB/s, ~790 TFLOP/s bf16 dense, 132 SMs):

* `index_cache_write`: one program per token; FP8 e4m3 with scale = amax / 448 per token, or a
  plain cast. Negligible (128 bytes per token).

* `indexer_scores`: program = (block of BLOCK_T consecutive query tokens, chunk of keys). The
  queries of the block, [BLOCK_T * H, D], stay on chip while the program walks its keys in tiles
  of BLOCK_S through the block table (loads pipelined with cp.async); one tl.dot per tile, ReLU,
  head weights, a sum over heads, the per-key scale. Tokens of one sequence share every key tile,
  so prefill reads the keys once per BLOCK_T tokens (GLM-5: a 128 x 64 x 128 fp8 wgmma tile);
  a block that straddles sequences runs one pass per sequence. Decode steps (T <= sequences) use
  BLOCK_T = 1 (a 32-row mma.sync tile). Keys past a token's position are never loaded. With an
  FP8 cache the queries are quantized per (token, head) inside the kernel, rounding as torch
  does (fp8_triton.round_to_e4m3, so also exact under the interpreter).
  128K context, batch 1: 16.8 MB of fp8 keys over 256 programs, memory-bound: ~5-7 us.

* top-k (ops/topk_triton.py): a multi-CTA radix select over the [T, S] score buffer (see that
  file for why not torch.topk): a memset, three histogram rounds and a gather, each reading the
  row from L2. 128K batch 1: ~2-3 us per launch, so indexer + top-k ~15-20 us, while the
  64-head sparse attention of one token (16 splits of 128 entries) should take ~8-12 us: the
  "indexer + top-k below attention at batch 1, 128K" target is probably missed by the launch
  chain, not by bandwidth (fusing the first round into the score kernel would save one launch).
  From batch 16 up the indexer is bandwidth-bound and the chain is amortised.
  Large prefill steps score at most SCORE_BUDGET_BYTES of [rows, S] at a time.

* `sparse_mla`: program = (token, block of BLOCK_H heads, split of the token's top-k list). Each
  gathered 576-wide entry is loaded once per program (cp.async into shared memory, 2 stages) and
  used by all its heads for both products (scores against latent + RoPE, values = the latent):
  with BLOCK_H = 64 one CTA serves all 64 heads of a rank and reads each entry once per token.
  Latent and RoPE parts use their own power-of-two aranges (512 + 64, not 1024). Online softmax
  in fp32 (exp2, scale folded), bf16 tl.dot with fp32 accumulation. Splitting the top-k list
  across programs (flash-decoding) fills the SMs when T * head blocks is small; a combine
  kernel merges splits by log-sum-exp. Head counts below 16 pad to tl.dot's 16-row minimum in
  registers only: 8 heads per rank load the bytes 64 heads would, with 1/4 of the tensor work.
  Batch 64, top-k 2048, 64 heads: 18.2 GFLOP over 151 MB of gathered bf16 entries, compute-bound
  (121 FLOP/B vs the ~184 FLOP/B ridge). The sm_90 build issues wgmma 64x32x16 (scores, N split
  over 2 warpgroups) and 64x256x16 (values), 221 KB of shared memory, but the 64 x 512 fp32
  accumulator (128 registers per thread over 8 warps) leaves ptxas ~60 registers short (wgmma
  descriptors spill, some inside the loop), and nothing overlaps gather, softmax and MMA the way
  FlashMLA's warp specialisation does. Expected 150-250 TFLOP/s (the 205 target is at the top).
  8 heads: the same 151 MB, memory-bound at ~40-50 us, so ~2x faster per token than the 64-head
  (= padded) kernel; the issue's 4x would need fewer bytes per entry (an FP8 MLA cache,
  FlashMLA's 656-byte entries), not a better kernel: reported by the bench, not promised here.

Tile configurations are plain data (`MLAConfig`, `ScoreConfig`) chosen by shape heuristics, not
run-time autotuning: autotuning would time kernels on first use in every process (slow starts,
no graph capture before it finishes); bench/dsa_kernels.py sweeps the candidates on a GPU so the
heuristics can be set from measurements.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fp8_triton import round_to_e4m3
from .topk_triton import topk_prefix

FP8_MAX: tl.constexpr = tl.constexpr(448.0)
SCALE_FLOOR: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).tiny)  # as ops/fp8.py
SCORE_BUDGET_BYTES = 256 << 20  # largest score buffer indexer_topk allocates per pass
_LOG2E = math.log2(math.e)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _interpreted(t: Tensor) -> bool:
    """CPU tensors can only run under Triton's interpreter, whose bf16 arithmetic is wrong."""
    return t.device.type == "cpu"


def _precision(t: Tensor) -> str:
    """tl.dot input precision: fp32 operands keep ~fp32 accuracy (3 tf32 products); others ignore it."""
    return "tf32x3" if t.dtype == torch.float32 and not _interpreted(t) else "ieee"


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


# ---- indexer key cache ------------------------------------------------------------------------


@triton.jit
def _index_cache_write_kernel(
    k_ptr, slot_ptr, cache_ptr, scale_ptr, D, stride_k,
    QUANT: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    x = tl.load(k_ptr + t * stride_k + d, mask=d < D, other=0.0).to(tl.float32)  # [BLOCK_D]
    if QUANT:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), FP8_MAX), SCALE_FLOOR)
        x = round_to_e4m3(tl.math.div_rn(x, scale))  # exact in the fp8 cast below
        tl.store(scale_ptr + slot, scale)
    tl.store(cache_ptr + slot * D + d, x.to(cache_ptr.dtype.element_ty), mask=d < D)


def index_cache_write(k: Tensor, slot_mapping: Tensor, index_cache: Tensor, index_scale: Tensor | None) -> None:
    """As dsa.index_cache_write_ref: k [T, D] into index_cache [num_blocks, block_size, D] at
    slot_mapping [T]; FP8 with a per-token scale into index_scale [num_blocks, block_size] when given."""
    num_tokens, dim = k.shape
    if num_tokens == 0:
        return
    if not index_cache.is_contiguous() or k.stride(1) != 1:
        raise ValueError("index_cache_write needs a contiguous cache and keys with contiguous rows")
    quant = index_scale is not None
    _index_cache_write_kernel[(num_tokens,)](
        k, slot_mapping, index_cache, index_scale if quant else index_cache, dim, k.stride(0),
        QUANT=quant, BLOCK_D=triton.next_power_of_2(dim),
    )  # fmt: skip


# ---- indexer scores ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreConfig:
    block_t: int  # query tokens per program (sharing key tiles when they share a sequence)
    block_s: int  # keys per tile
    chunk: int  # keys per program
    num_warps: int
    num_stages: int


def score_config(num_tokens: int, num_seqs: int, heads: int, cache_dtype: torch.dtype) -> ScoreConfig:
    """Decode-like steps (no more tokens than sequences) score one token per program; otherwise
    up to 4 tokens share each key tile. Checked by compiling for sm_90 at GLM-5 sizes (32 heads x
    128, fp8): prefill is a 128 x 64 x 128 wgmma tile, decode a 32-row mma.sync tile, no spills."""
    if cache_dtype == torch.float32:  # tf32x3 products need small tiles
        return ScoreConfig(1, 64, 512, 4, 2)
    if num_tokens <= num_seqs:
        return ScoreConfig(1, 128, 512, 4, 3)
    block_t = max(1, min(4, 128 // _pow2(heads)))
    return ScoreConfig(block_t, 64, 512, 8 if block_t * _pow2(heads) >= 128 else 4, 2)


@triton.jit
def _indexer_scores_kernel(
    q_ptr, w_ptr, k_ptr, ks_ptr, bt_ptr, seq_ptr, pos_ptr, out_ptr,
    T, H, D, S, max_blocks, stride_qt, stride_qh, stride_wt, stride_ot,
    CACHE_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
    KEY_SCALE: tl.constexpr,  # FP8 cache: fp8 dot, then times the per-key scale
    QUANT_Q: tl.constexpr,  # quantize q per (token, head) to fp8 here, folding its scale into w
    UPCAST: tl.constexpr,  # dot in fp32 (the interpreter)
    PRECISION: tl.constexpr,
):  # fmt: skip
    # rows of the query tile: r = (token r // BLOCK_H of the block, head r % BLOCK_H)
    rows = tl.arange(0, BLOCK_T * BLOCK_H)
    t_row = tl.program_id(0) * BLOCK_T + rows // BLOCK_H
    h_row = rows % BLOCK_H
    row_ok = (t_row < T) & (h_row < H)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + t_row[:, None].to(tl.int64) * stride_qt + h_row[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & (d < D)[None, :], other=0.0,
    )  # [R, BLOCK_D]
    w = tl.load(w_ptr + t_row.to(tl.int64) * stride_wt + h_row, mask=row_ok, other=0.0)  # [R]
    if QUANT_Q:
        qf = q.to(tl.float32)
        q_scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(qf), axis=1), FP8_MAX), SCALE_FLOOR)  # [R]
        q = round_to_e4m3(tl.math.div_rn(qf, q_scale[:, None])).to(k_ptr.dtype.element_ty)
        w = w * q_scale
    if UPCAST:
        q = q.to(tl.float32)
    else:  # a bf16 cache takes bf16 queries (tensor cores); an fp32 one keeps fp32 (tf32x3 on a GPU)
        q = q.to(k_ptr.dtype.element_ty)

    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    seqs = tl.load(seq_ptr + toks, mask=toks < T, other=0)
    n_vis = tl.minimum(tl.load(pos_ptr + toks, mask=toks < T, other=-1) + 1, S)  # visible keys per token
    lo = tl.program_id(1) * CHUNK
    done = toks >= T
    for _ in range(BLOCK_T):  # one pass per distinct sequence among the block's tokens
        if tl.sum((done == 0).to(tl.int32), axis=0) > 0:
            first = tl.min(tl.where(done, BLOCK_T, tl.arange(0, BLOCK_T)), axis=0)
            seq = tl.sum(tl.where(tl.arange(0, BLOCK_T) == first, seqs, 0), axis=0)
            member = (done == 0) & (seqs == seq)  # [BLOCK_T]
            seq_vis = tl.max(tl.where(member, n_vis, 0), axis=0)
            table = bt_ptr + seq.to(tl.int64) * max_blocks
            hi = tl.minimum(lo + CHUNK, seq_vis)  # the keys of this chunk that a member sees
            for s0 in range(lo, hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S] key positions
                s_ok = s < seq_vis
                slot = tl.load(table + s // CACHE_BLOCK, mask=s_ok, other=0).to(tl.int64) * CACHE_BLOCK
                slot += s % CACHE_BLOCK
                k = tl.load(
                    k_ptr + slot[:, None] * D + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0
                )  # [BLOCK_S, BLOCK_D]
                if UPCAST:
                    k = k.to(tl.float32)
                logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [R, BLOCK_S] fp32
                logits = tl.maximum(logits, 0.0) * w[:, None]
                sc = tl.sum(tl.reshape(logits, (BLOCK_T, BLOCK_H, BLOCK_S)), axis=1)  # [BLOCK_T, BLOCK_S]
                if KEY_SCALE:
                    sc = sc * tl.load(ks_ptr + slot, mask=s_ok, other=0.0)[None, :]
                sc = tl.where(s[None, :] < n_vis[:, None], sc, float("-inf"))
                dst = out_ptr + toks[:, None].to(tl.int64) * stride_ot + s[None, :]
                tl.store(dst, sc, mask=member[:, None] & (s < S)[None, :])
            for s0 in range(lo + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_S) * BLOCK_S, lo + CHUNK, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)  # keys after every member's position
                dst = out_ptr + toks[:, None].to(tl.int64) * stride_ot + s[None, :]
                sc = tl.full((BLOCK_T, BLOCK_S), float("-inf"), tl.float32)
                tl.store(dst, sc, mask=member[:, None] & (s < S)[None, :])
            done = done | member


def indexer_scores(
    q: Tensor,  # [T, H, D] fp32 (fp8 when already quantized per row, its scale folded into weights)
    weights: Tensor,  # [T, H] fp32
    index_cache: Tensor,  # [num_blocks, block_size, D]
    block_tables: Tensor,  # [B, max_blocks] int32
    seq_ids: Tensor,  # [T]
    positions: Tensor,  # [T]
    index_scale: Tensor | None = None,  # [num_blocks, block_size] fp32 for an FP8 cache
    out: Tensor | None = None,  # [T, max_blocks * block_size] fp32
    config: ScoreConfig | None = None,
) -> Tensor:
    """As dsa.indexer_scores_ref: [T, max_blocks * block_size] fp32, -inf where not visible."""
    num_tokens, heads, dim = q.shape
    block_size = index_cache.shape[1]
    width = block_tables.shape[1] * block_size
    if out is None:
        out = torch.empty(num_tokens, width, dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return out
    if not index_cache.is_contiguous() or q.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("indexer_scores needs a contiguous cache and contiguous rows of q and out")
    fp8 = index_scale is not None
    weights = weights.float().contiguous()
    cfg = config or score_config(num_tokens, block_tables.shape[0], heads, index_cache.dtype)
    if cfg.chunk % cfg.block_s:
        raise ValueError(f"score chunk {cfg.chunk} is not a multiple of the key tile {cfg.block_s}")
    grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(width, cfg.chunk))
    _indexer_scores_kernel[grid](
        q, weights, index_cache, index_scale if fp8 else weights, block_tables, seq_ids, positions, out,
        num_tokens, heads, dim, width, block_tables.shape[1], q.stride(0), q.stride(1), weights.stride(0),
        out.stride(0),
        CACHE_BLOCK=block_size, BLOCK_T=cfg.block_t, BLOCK_H=_pow2(heads, 16 // cfg.block_t),
        BLOCK_D=_pow2(dim), BLOCK_S=cfg.block_s, CHUNK=cfg.chunk,
        KEY_SCALE=fp8, QUANT_Q=fp8 and q.dtype != index_cache.dtype, UPCAST=_interpreted(q),
        PRECISION=_precision(index_cache), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def indexer_topk(
    q: Tensor,  # [T, H, D] indexer queries (RoPE applied), fp32
    weights: Tensor,  # [T, H] per-head weights with every scale folded in, fp32
    index_cache: Tensor,  # [num_blocks, block_size, D] indexer keys
    block_tables: Tensor,  # [B, max_blocks]
    seq_ids: Tensor,  # [T]
    positions: Tensor,  # [T]
    topk: int,
    index_scale: Tensor | None = None,  # [num_blocks, block_size] per-key scale of an FP8 cache
) -> Tensor:
    """As dsa.indexer_topk_ref: [T, topk] int32 positions of the best visible keys, -1 = empty.
    Scores at most SCORE_BUDGET_BYTES of [rows, S] at a time (a static loop over row slices)."""
    num_tokens = q.shape[0]
    width = block_tables.shape[1] * index_cache.shape[1]
    out = torch.empty(num_tokens, topk, dtype=torch.int32, device=q.device)
    rows = max(1, min(num_tokens, SCORE_BUDGET_BYTES // (4 * width)))
    scores = torch.empty(rows, width, dtype=torch.float32, device=q.device)
    for r0 in range(0, num_tokens, rows):
        r1 = min(r0 + rows, num_tokens)
        part = indexer_scores(
            q[r0:r1], weights[r0:r1], index_cache, block_tables, seq_ids[r0:r1], positions[r0:r1], index_scale,
            out=scores[: r1 - r0],
        )  # fmt: skip
        topk_prefix(part, positions[r0:r1], topk, out=out[r0:r1])
    return out


# ---- sparse MLA -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLAConfig:
    block_h: int  # heads per program (>= 16: tl.dot's smallest tile)
    block_n: int  # gathered entries per step
    num_warps: int
    num_stages: int


def mla_config(heads: int, v_dim: int, dtype: torch.dtype) -> MLAConfig:
    """Tile configuration by shape. For GLM-5's 512-wide latent (checked by compiling for sm_90):
    64 heads take one 64 x 64 wgmma tile per step (221 KB of shared memory with two stages; the
    64 x 512 fp32 accumulator leaves ptxas ~60 registers short: it spills wgmma descriptors,
    a few reloads inside the loop); 32 or 16 heads use mma.sync tiles with no spills."""
    if dtype == torch.float32:  # exactness tests: tf32x3 dots, small tiles
        return MLAConfig(16, 16, 4, 1)
    if v_dim >= 256:
        if heads > 32:
            return MLAConfig(64, 64, 8, 2)
        return MLAConfig(32, 32, 8, 2) if heads > 16 else MLAConfig(16, 32, 4, 2)
    return MLAConfig(min(64, _pow2(heads)), 32, 4, 2)


def mla_splits(work_items: int, topk: int, cfg: MLAConfig, entry_bytes: int, num_sms: int) -> int:
    """How many programs share each (token, head block)'s top-k list: the fewest splits that
    minimise waves per unit of work, given how many programs fit on an SM (shared memory), with
    at least two steps per split. Batch 64 x 64 heads on 132 SMs: 2 splits, 128 programs."""
    smem = (cfg.block_h + cfg.num_stages * cfg.block_n) * entry_bytes
    slots = num_sms * max(1, (228 << 10) // smem)
    most = max(1, topk // (2 * cfg.block_n))
    return min(range(1, most + 1), key=lambda s: (triton.cdiv(work_items * s, slots) / s, s))


@triton.jit
def _sparse_mla_kernel(
    q_ptr, kv_ptr, idx_ptr, bt_ptr, seq_ptr, out_ptr, lse_ptr,
    H, K, DV, DK, max_blocks, stride_qt, stride_qh, stride_it, scale_log2, splits,
    CACHE_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(1)
    head_blocks = tl.cdiv(H, BLOCK_H)
    split = tl.program_id(0) // head_blocks
    h = (tl.program_id(0) % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dv = tl.arange(0, BLOCK_DV)  # latent columns
    dr = tl.arange(0, BLOCK_DR)  # RoPE columns, after the latent
    dv_ok = dv < DV
    dr_ok = dr < DK - DV
    q_row = q_ptr + t.to(tl.int64) * stride_qt + h[:, None] * stride_qh
    q_lat = tl.load(q_row + dv[None, :], mask=(h < H)[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_DV]
    q_rope = tl.load(q_row + DV + dr[None, :], mask=(h < H)[:, None] & dr_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_DR]
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    table = bt_ptr + tl.load(seq_ptr + t).to(tl.int64) * max_blocks

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_N), splits) * BLOCK_N
    lo = split * per_split
    for n0 in range(lo, tl.minimum(lo + per_split, K), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_ptr + t.to(tl.int64) * stride_it + n, mask=n < K, other=-1)  # [BLOCK_N]
        ok = idx >= 0
        pos = tl.maximum(idx, 0)
        slot = tl.load(table + pos // CACHE_BLOCK, mask=ok, other=0).to(tl.int64) * CACHE_BLOCK
        slot += pos % CACHE_BLOCK
        row = kv_ptr + slot[:, None] * DK
        kv_lat = tl.load(row + dv[None, :], mask=ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        kv_rope = tl.load(row + DV + dr[None, :], mask=ok[:, None] & dr_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DR]
        if UPCAST:
            kv_lat = kv_lat.to(tl.float32)
            kv_rope = kv_rope.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(kv_lat), input_precision=PRECISION)
        s = tl.dot(q_rope, tl.trans(kv_rope), acc=s, input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet stay at zero
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])  # [BLOCK_H, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_lat.dtype), kv_lat, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # [BLOCK_H, BLOCK_DV]
    h_ok = (h < H)[:, None] & dv_ok[None, :]
    if splits == 1:
        dst = out_ptr + (t.to(tl.int64) * H + h[:, None]) * DV + dv[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=h_ok)
    else:  # partial result and its log2-sum-exp2, merged by _mla_combine_kernel
        part = (t.to(tl.int64) * splits + split) * H + h
        tl.store(out_ptr + part[:, None] * DV + dv[None, :], out, mask=h_ok)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=h < H)


@triton.jit
def _mla_combine_kernel(
    part_ptr, lse_ptr, out_ptr, H, DV, splits, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, BLOCK_SPLITS)
    dv = tl.arange(0, BLOCK_DV)
    part = (t * splits + sp) * H + h  # [BLOCK_SPLITS]
    lse = tl.load(lse_ptr + part, mask=sp < splits, other=float("-inf"))
    top = tl.max(lse, axis=0)
    wgt = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [BLOCK_SPLITS]
    o_mask = (sp < splits)[:, None] & (dv < DV)[None, :]
    o = tl.load(part_ptr + part[:, None] * DV + dv[None, :], mask=o_mask, other=0.0)  # [BLOCK_SPLITS, BLOCK_DV]
    total = tl.sum(wgt, axis=0)
    res = tl.sum(o * wgt[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # [BLOCK_DV]
    tl.store(out_ptr + (t * H + h) * DV + dv, res.to(out_ptr.dtype.element_ty), mask=dv < DV)


def sparse_mla(
    q: Tensor,  # [T, H, Dk] absorbed queries: latent part then RoPE part
    kv_cache: Tensor,  # [num_blocks, block_size, Dk] cached entries: latent (the values) then RoPE key
    indices: Tensor,  # [T, K] selected positions, -1 = empty
    block_tables: Tensor,  # [B, max_blocks]
    seq_ids: Tensor,  # [T]
    softmax_scale: float,
    v_dim: int,  # the latent width; values are the first v_dim columns of an entry
) -> Tensor:
    """As dsa.sparse_mla_ref: attention of each head over its token's selected entries -> [T, H, v_dim]."""
    return sparse_mla_with(None, None, q, kv_cache, indices, block_tables, seq_ids, softmax_scale, v_dim)


def sparse_mla_with(
    config: MLAConfig | None, splits: int | None,
    q: Tensor, kv_cache: Tensor, indices: Tensor, block_tables: Tensor, seq_ids: Tensor,
    softmax_scale: float, v_dim: int,
) -> Tensor:  # fmt: skip
    """sparse_mla with an explicit tile configuration and number of splits (None: the heuristics)."""
    num_tokens, heads, dk = q.shape
    topk = indices.shape[1]
    out = torch.empty(num_tokens, heads, v_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if not kv_cache.is_contiguous() or q.stride(2) != 1 or indices.stride(1) != 1:
        raise ValueError("sparse_mla needs a contiguous cache and contiguous rows of q and indices")
    cfg = config or mla_config(heads, v_dim, q.dtype)
    head_blocks = triton.cdiv(heads, cfg.block_h)
    if splits is None:
        splits = mla_splits(num_tokens * head_blocks, topk, cfg, dk * q.element_size(), _num_sms(q.device))
    if splits > 1:
        part = torch.empty(num_tokens, splits, heads, v_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_tokens, splits, heads, dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out
    _sparse_mla_kernel[(head_blocks * splits, num_tokens)](
        q, kv_cache, indices, block_tables, seq_ids, part, lse,
        heads, topk, v_dim, dk, block_tables.shape[1], q.stride(0), q.stride(1), indices.stride(0),
        softmax_scale * _LOG2E, splits,
        CACHE_BLOCK=kv_cache.shape[1], BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n,
        BLOCK_DV=_pow2(v_dim), BLOCK_DR=_pow2(dk - v_dim), UPCAST=_interpreted(q),
        PRECISION=_precision(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _mla_combine_kernel[(heads, num_tokens)](
            part, lse, out, heads, v_dim, splits, BLOCK_SPLITS=triton.next_power_of_2(splits), BLOCK_DV=_pow2(v_dim),
        )  # fmt: skip
    return out
