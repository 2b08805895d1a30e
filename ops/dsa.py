"""DeepSeek Sparse Attention (DSA) over the paged cache: plain-torch references.

The lightning indexer scores every earlier key of a query token's sequence,
    score(t, s) = sum_h w[t, h] * relu(q[t, h] . k[s])
keeps the `topk` best keys, and MLA attention then attends only to those.
Positions are counted within a sequence; a key at position s is visible to a query token
at position p when s <= p. Caches are paged: [num_blocks, block_size, width], and a
sequence's position s lives at slot block_tables[seq, s // block_size] * block_size + s % block_size.

The indexer key cache is either plain (bf16/fp32, exact) or FP8: e4m3 keys with one fp32 scale
per token, `index_scale [num_blocks, block_size]` (scale = amax / 448). With an FP8 cache the
queries are quantized the same way per (token, head) and their scales folded into the head
weights, so every product is fp8 x fp8 with fp32 accumulation, as production engines do:
    score(t, s) = k_scale[s] * sum_h (w[t, h] * q_scale[t, h]) * relu(q8[t, h] . k8[s])
(both scales are positive, so they pass through the ReLU).

These functions know no model: they take tensors and sizes. Fast Triton kernels with the
same signatures plug in through `glm5c.ops.Ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fp8 import quantize_act_groups
from .gemv import gemv


def gather_sequences(cache: Tensor, block_tables: Tensor) -> Tensor:
    """cache [num_blocks, block_size, D], block_tables [B, max_blocks] -> [B, max_blocks * block_size, D]."""
    num_seqs, max_blocks = block_tables.shape
    rows = cache[block_tables.long()]  # [B, max_blocks, block_size, D]
    return rows.reshape(num_seqs, max_blocks * cache.shape[1], cache.shape[2])


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., D] -> (x_fp8 [..., D] float8_e4m3fn, scale [...] fp32): one scale per row, amax / 448."""
    x_fp8, scale = quantize_act_groups(x, group=x.shape[-1])  # scale [..., 1]
    return x_fp8, scale[..., 0]


def index_cache_write_ref(k: Tensor, slot_mapping: Tensor, index_cache: Tensor, index_scale: Tensor | None) -> None:
    """Write indexer keys k [T, D] at slot_mapping [T] into index_cache [num_blocks, block_size, D]:
    as they are (cast to the cache dtype) when index_scale is None, else as FP8 e4m3 with their
    per-token scale into index_scale [num_blocks, block_size]."""
    where = (slot_mapping // index_cache.shape[1], slot_mapping % index_cache.shape[1])  # (block, offset)
    if index_scale is None:
        index_cache.index_put_(where, k.to(index_cache.dtype))
        return
    k_fp8, scale = quantize_rows_fp8(k)  # [T, D], [T]
    index_cache.index_put_(where, k_fp8)
    index_scale.index_put_(where, scale)


def indexer_scores_ref(
    q: Tensor,  # [T, H, D] indexer queries (RoPE applied), fp32
    weights: Tensor,  # [T, H] per-head weights with every scale folded in, fp32
    index_cache: Tensor,  # [num_blocks, block_size, D] indexer keys (fp8 when index_scale is given)
    block_tables: Tensor,  # [B, max_blocks]
    seq_ids: Tensor,  # [T] row of block_tables for each query token
    positions: Tensor,  # [T] position of each query token in its sequence
    index_scale: Tensor | None = None,  # [num_blocks, block_size] fp32 per-key scale of an FP8 cache
) -> Tensor:
    """Scores of every key position of each token's sequence: [T, max_blocks * block_size] fp32,
    -inf where the key is not visible (after the token's position)."""
    keys = gather_sequences(index_cache, block_tables)[seq_ids.long()].float()  # [T, S, D]
    weights = weights.float()
    if index_scale is not None:
        q_fp8, q_scale = quantize_rows_fp8(q)  # [T, H, D], [T, H]
        q, weights = q_fp8, weights * q_scale
        key_scale = gather_sequences(index_scale[..., None], block_tables)[seq_ids.long()]  # [T, S, 1]
        keys = keys * key_scale.float()
    scores = torch.relu(torch.einsum("thd,tsd->ths", q.float(), keys))  # [T, H, S]
    scores = torch.einsum("th,ths->ts", weights, scores)  # [T, S]
    key_pos = torch.arange(keys.shape[1], device=q.device)
    visible = key_pos[None, :] <= positions[:, None]  # [T, S]
    return scores.masked_fill(~visible, float("-inf"))


def topk_indices_ref(scores: Tensor, topk: int) -> Tensor:
    """scores [T, S] (-inf = not a candidate) -> column indices of the `topk` best candidates,
    [T, topk] int32, -1 in slots left empty. Order within a row is unspecified."""
    k = min(topk, scores.shape[1])
    best, idx = scores.topk(k, dim=-1)  # [T, k]
    idx = idx.to(torch.int32).masked_fill(best == float("-inf"), -1)
    if k < topk:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], topk - k), -1)], dim=-1)
    return idx


def indexer_topk_ref(
    q: Tensor,  # [T, H, D] indexer queries (RoPE applied), fp32
    weights: Tensor,  # [T, H] per-head weights with every scale folded in, fp32
    index_cache: Tensor,  # [num_blocks, block_size, D] indexer keys
    block_tables: Tensor,  # [B, max_blocks]
    seq_ids: Tensor,  # [T] row of block_tables for each query token
    positions: Tensor,  # [T] position of each query token in its sequence
    topk: int,
    index_scale: Tensor | None = None,  # [num_blocks, block_size] per-key scale of an FP8 cache
) -> Tensor:
    """Indices (positions in the sequence) of the `topk` best-scoring visible keys: [T, topk] int32,
    -1 in the slots left empty when fewer than `topk` keys are visible. Order within a row is unspecified."""
    scores = indexer_scores_ref(q, weights, index_cache, block_tables, seq_ids, positions, index_scale)
    return topk_indices_ref(scores, topk)


def selected_entries(kv_cache: Tensor, indices: Tensor, block_tables: Tensor, seq_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each token's selected cache entries through its block table -> (entries [T, K, Dk] in the
    cache's dtype, valid [T, K]); an empty slot (-1) reads position 0 and is marked invalid."""
    block_size = kv_cache.shape[1]
    valid = indices >= 0  # [T, K]
    pos = indices.long().clamp(min=0)
    blocks = block_tables.long()[seq_ids.long()[:, None], pos // block_size]  # [T, K]
    slots = blocks * block_size + pos % block_size
    return kv_cache.reshape(-1, kv_cache.shape[-1])[slots], valid


def sparse_mla_ref(
    q: Tensor,  # [T, H, Dk] absorbed queries: latent part then RoPE part
    kv_cache: Tensor,  # [num_blocks, block_size, Dk] cached entries: latent (the values) then RoPE key
    indices: Tensor,  # [T, K] selected positions, -1 = empty
    block_tables: Tensor,  # [B, max_blocks]
    seq_ids: Tensor,  # [T]
    softmax_scale: float,
    v_dim: int,  # the latent width; values are the first v_dim columns of an entry
) -> Tensor:
    """Attention of each query head over its token's selected cache entries -> [T, H, v_dim] in q's dtype."""
    entries, valid = selected_entries(kv_cache, indices, block_tables, seq_ids)
    entries = entries.float()  # [T, K, Dk]
    scores = torch.einsum("thd,tkd->thk", q.float(), entries) * softmax_scale  # [T, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("thk,tkd->thd", probs, entries[..., :v_dim])  # [T, H, v_dim]
    return out.to(q.dtype)


def sparse_mla_lowp(
    q: Tensor,  # [T, H, Dk] absorbed queries: latent part then RoPE part
    kv_cache: Tensor,  # [num_blocks, block_size, Dk]
    indices: Tensor,  # [T, K] selected positions, -1 = empty
    block_tables: Tensor,  # [B, max_blocks]
    seq_ids: Tensor,  # [T]
    softmax_scale: float,
    v_dim: int,
) -> Tensor:
    """sparse_mla_ref with both matmuls in q's dtype (fp32 accumulation inside the GEMM, the
    softmax in fp32), as transformers' eager attention runs a BF16 model: no fp32 copy of the
    gathered entries ([T, K, Dk], 9.4 MB a layer for 16 tokens and K = 256). A CPU's BF16 graphs
    take it: eager, 1.2-3.8x faster than the reference for 1-64 tokens (mini's shapes); compiled,
    the mini preset's batch-16 prefill went from 122 to 69 ms (bench/README.md)."""
    entries, valid = selected_entries(kv_cache, indices, block_tables, seq_ids)
    entries = entries.to(q.dtype)  # [T, K, Dk]
    scores = torch.bmm(q, entries.transpose(1, 2)).float() * softmax_scale  # [T, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    # over whole entries, then keep the values: a GEMM takes [K, Dk] as it is, where the [K, v_dim]
    # slice would be copied first (16 x 256 x 128 a layer at batch 16 on mini, ~50 us)
    return torch.bmm(probs, entries)[..., :v_dim]  # [T, H, v_dim]


def sparse_mla_gemv(
    q: Tensor, kv_cache: Tensor, indices: Tensor, block_tables: Tensor, seq_ids: Tensor, softmax_scale: float, v_dim: int
) -> Tensor:  # fmt: skip
    """sparse_mla_lowp's math with both products as `gemv`: compiled, one loop per product reading
    the selected entries straight from the paged cache (no gathered copy, no GEMM call). Same
    roundings as sparse_mla_lowp (BF16 products with fp32 accumulation, softmax in fp32). A CPU's
    BF16 graphs take it for 1-4 tokens (ops/dsa_cpu.py)."""
    entries, valid = selected_entries(kv_cache, indices, block_tables, seq_ids)
    entries = entries.to(q.dtype).unsqueeze(1)  # [T, 1, K, Dk]: one matrix per token, for all its heads
    scores = gemv(q, entries).float() * softmax_scale  # [T, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return gemv(probs, entries[..., :v_dim].transpose(-1, -2))  # [T, H, v_dim]
