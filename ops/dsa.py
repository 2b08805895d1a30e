"""DeepSeek Sparse Attention (DSA) over the paged cache: plain-torch references.

The lightning indexer scores every earlier key of a query token's sequence,
    score(t, s) = sum_h w[t, h] * relu(q[t, h] . k[s])
keeps the `topk` best keys, and MLA attention then attends only to those.
Positions are counted within a sequence; a key at position s is visible to a query token
at position p when s <= p. Caches are paged: [num_blocks, block_size, width], and a
sequence's position s lives at slot block_tables[seq, s // block_size] * block_size + s % block_size.

These functions know no model: they take tensors and sizes. Fast Triton kernels with the
same signatures plug in through `glm5c.ops.Ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather_sequences(cache: Tensor, block_tables: Tensor) -> Tensor:
    """cache [num_blocks, block_size, D], block_tables [B, max_blocks] -> [B, max_blocks * block_size, D]."""
    num_seqs, max_blocks = block_tables.shape
    rows = cache[block_tables.long()]  # [B, max_blocks, block_size, D]
    return rows.reshape(num_seqs, max_blocks * cache.shape[1], cache.shape[2])


def indexer_topk_ref(
    q: Tensor,  # [T, H, D] indexer queries (RoPE applied), fp32
    weights: Tensor,  # [T, H] per-head weights with every scale folded in, fp32
    index_cache: Tensor,  # [num_blocks, block_size, D] indexer keys
    block_tables: Tensor,  # [B, max_blocks]
    seq_ids: Tensor,  # [T] row of block_tables for each query token
    positions: Tensor,  # [T] position of each query token in its sequence
    topk: int,
) -> Tensor:
    """Indices (positions in the sequence) of the `topk` best-scoring visible keys: [T, topk] int32,
    -1 in the slots left empty when fewer than `topk` keys are visible. Order within a row is unspecified."""
    keys = gather_sequences(index_cache, block_tables)[seq_ids.long()].float()  # [T, S, D]
    num_keys = keys.shape[1]
    scores = torch.relu(torch.einsum("thd,tsd->ths", q.float(), keys))  # [T, H, S]
    scores = torch.einsum("th,ths->ts", weights.float(), scores)  # [T, S]
    key_pos = torch.arange(num_keys, device=q.device)
    visible = key_pos[None, :] <= positions[:, None]  # [T, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    k = min(topk, num_keys)
    best, idx = scores.topk(k, dim=-1)  # [T, k]
    idx = idx.to(torch.int32).masked_fill(best == float("-inf"), -1)
    if k < topk:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], topk - k), -1)], dim=-1)
    return idx


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
    block_size = kv_cache.shape[1]
    valid = indices >= 0  # [T, K]
    pos = indices.long().clamp(min=0)
    blocks = block_tables.long()[seq_ids.long()[:, None], pos // block_size]  # [T, K]
    slots = blocks * block_size + pos % block_size
    entries = kv_cache.reshape(-1, kv_cache.shape[-1])[slots].float()  # [T, K, Dk]
    scores = torch.einsum("thd,tkd->thk", q.float(), entries) * softmax_scale  # [T, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("thk,tkd->thd", probs, entries[..., :v_dim])  # [T, H, v_dim]
    return out.to(q.dtype)
