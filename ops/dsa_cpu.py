"""DSA for a CPU's BF16 graphs: C++ kernels for the indexer's top-k and sparse MLA, reading the paged
caches in place.

`indexer_topk` computes what `dsa.indexer_topk_ref` does for a BF16 index cache as the opaque op
`glm5c::indexer_topk_cpu` (ops/cpu/bf16_kernels.cpp: glm5c_indexer_topk_bf16): per token, the
fp32 scores of its visible keys read from the cache where they are (the reference gathers an
fp32 [T, S, D] copy and calls a GEMM), then a partial sort; a token that sees at most topk keys
takes all of them unscored. An FP8 index cache takes the reference.

`sparse_mla` computes what `dsa.sparse_mla_lowp` computes (its roundings: BF16 scores with fp32
sums, softmax in fp32, BF16 probabilities) as the opaque op `glm5c::sparse_mla_cpu`, which a
compiled graph calls: ops/cpu/bf16_kernels.cpp (glm5c_sparse_mla_bf16). sparse_mla_lowp gathers a
[T, K, Dk] copy of the entries (index arithmetic per vector: ~170 us a layer at 16 tokens on
mini) and calls two GEMMs; the kernel reads the entries where they are, scores them in register
tiles, takes the softmax in 16 lanes and sums the values over pairs of entries with vdpbf16ps
(16 tokens x 8 heads over 256 entries each: ~3x faster than the one-entry-at-a-time form before,
245-260 -> 70-77 us in interleaved runs).
Built and loaded by ops/cpu_kernels.py; without a compiler the op runs sparse_mla_lowp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernels, dsa



def sparse_mla_bf16(q: Tensor, kv_cache: Tensor, indices: Tensor, block_tables: Tensor, seq_ids: Tensor,
                    softmax_scale: float, v_dim: int) -> Tensor:  # fmt: skip
    """The kernel, eagerly: q [T, H, Dk] bf16, kv_cache [num_blocks, block_size, Dk] bf16, indices
    [T, K] int32, block_tables [B, W] int32, seq_ids [T] int64 -> [T, H, v_dim] bf16."""
    cpu_kernels.check_tensors("sparse_mla_cpu", q=(q, torch.bfloat16, 3), kv_cache=(kv_cache, torch.bfloat16, 3),
                              indices=(indices, torch.int32, 2), block_tables=(block_tables, torch.int32, 2),
                              seq_ids=(seq_ids, torch.int64, 1))  # fmt: skip
    tokens, heads, dk = q.shape
    if kv_cache.shape[-1] != dk or indices.shape[0] != tokens or seq_ids.shape[0] != tokens or not 0 < v_dim <= dk:
        raise ValueError(f"sparse_mla_cpu: shapes do not fit: q {tuple(q.shape)}, kv_cache {tuple(kv_cache.shape)}, "
                         f"indices {tuple(indices.shape)}, seq_ids {tuple(seq_ids.shape)}, v_dim {v_dim}")  # fmt: skip
    lib = cpu_kernels.load()
    if lib is None:
        return dsa.sparse_mla_lowp(q, kv_cache, indices, block_tables, seq_ids, softmax_scale, v_dim)
    q, kv, idx, tables, seqs = (t.contiguous() for t in (q, kv_cache, indices, block_tables, seq_ids))
    out = q.new_empty(tokens, heads, v_dim)
    rc = lib.glm5c_sparse_mla_bf16(q.data_ptr(), kv.data_ptr(), idx.data_ptr(), tables.data_ptr(), seqs.data_ptr(),
                                   out.data_ptr(), tokens, heads, dk, v_dim, indices.shape[1], kv.shape[1],
                                   tables.shape[0], tables.shape[1], kv.shape[0] * kv.shape[1], softmax_scale,
                                   torch.get_num_threads())  # fmt: skip
    cpu_kernels.check_status("sparse_mla_cpu", rc, "a selected position or its block")
    return out


cpu_kernels.define_op(
    "sparse_mla_cpu(Tensor q, Tensor kv_cache, Tensor indices, Tensor block_tables, Tensor seq_ids, "
    "float softmax_scale, int v_dim) -> Tensor",
    lambda *args: sparse_mla_bf16(*args),
    lambda q, kv_cache, indices, block_tables, seq_ids, softmax_scale, v_dim: q.new_empty(*q.shape[:2], v_dim),
)


def indexer_topk_bf16(q: Tensor, weights: Tensor, index_cache: Tensor, block_tables: Tensor, seq_ids: Tensor,
                      positions: Tensor, topk: int) -> Tensor:  # fmt: skip
    """The indexer kernel, eagerly: q [T, H, D] fp32, weights [T, H] fp32, index_cache [num_blocks,
    block_size, D] bf16, block_tables [B, W] int32, seq_ids, positions [T] int64 -> [T, topk] int32."""
    cpu_kernels.check_tensors("indexer_topk_cpu", q=(q, torch.float32, 3), weights=(weights, torch.float32, 2),
                              index_cache=(index_cache, torch.bfloat16, 3), block_tables=(block_tables, torch.int32, 2),
                              seq_ids=(seq_ids, torch.int64, 1), positions=(positions, torch.int64, 1))  # fmt: skip
    tokens, heads, dim = q.shape
    if tuple(weights.shape) != (tokens, heads) or index_cache.shape[-1] != dim or seq_ids.shape[0] != tokens \
            or positions.shape[0] != tokens or topk < 1:  # fmt: skip
        raise ValueError(f"indexer_topk_cpu: shapes do not fit: q {tuple(q.shape)}, weights {tuple(weights.shape)}, "
                         f"index_cache {tuple(index_cache.shape)}, seq_ids {tuple(seq_ids.shape)}, positions "
                         f"{tuple(positions.shape)}, topk {topk}")  # fmt: skip
    lib = cpu_kernels.load()
    if lib is None:
        return dsa.indexer_topk_ref(q, weights, index_cache, block_tables, seq_ids, positions, topk)
    q, weights, cache, tables, seqs, pos = (t.contiguous() for t in (q, weights, index_cache, block_tables, seq_ids,
                                                                     positions))  # fmt: skip
    out = torch.empty(tokens, topk, dtype=torch.int32)
    rc = lib.glm5c_indexer_topk_bf16(q.data_ptr(), weights.data_ptr(), cache.data_ptr(), tables.data_ptr(),
                                     seqs.data_ptr(), pos.data_ptr(), out.data_ptr(), tokens, heads, dim, topk,
                                     cache.shape[1], tables.shape[0], tables.shape[1], cache.shape[0] * cache.shape[1],
                                     torch.get_num_threads())  # fmt: skip
    cpu_kernels.check_status("indexer_topk_cpu", rc, "a position or its block")
    return out


cpu_kernels.define_op(
    "indexer_topk_cpu(Tensor q, Tensor weights, Tensor index_cache, Tensor block_tables, Tensor seq_ids, "
    "Tensor positions, int topk) -> Tensor",
    lambda *args: indexer_topk_bf16(*args),
    lambda q, weights, index_cache, block_tables, seq_ids, positions, topk: q.new_empty(q.shape[0], topk,
                                                                                        dtype=torch.int32),
)


def indexer_topk(
    q: Tensor, weights: Tensor, index_cache: Tensor, block_tables: Tensor, seq_ids: Tensor, positions: Tensor,
    topk: int, index_scale: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Ops.indexer_topk for a CPU's BF16 graphs: the kernel's op for a BF16 index cache, else the
    reference. (While the attention after it was `sparse_mla_gemv` for up to 4 tokens, the op
    could not come before it: Inductor fused the query's computation (RoPE, norms) into that loop,
    redoing it per selected entry, whole mini decode graphs 5.5-6.7x slower. With both ops opaque
    nothing is fused across them.)"""
    if index_scale is None and index_cache.dtype == torch.bfloat16 and q.dtype == weights.dtype == torch.float32:
        return torch.ops.glm5c.indexer_topk_cpu(q, weights, index_cache, block_tables, seq_ids, positions, topk)
    return dsa.indexer_topk_ref(q, weights, index_cache, block_tables, seq_ids, positions, topk, index_scale)


def sparse_mla(
    q: Tensor, kv_cache: Tensor, indices: Tensor, block_tables: Tensor, seq_ids: Tensor, softmax_scale: float, v_dim: int
) -> Tensor:  # fmt: skip
    """Ops.sparse_mla for a CPU's BF16 graphs: the kernel's op for any number of tokens (not BF16:
    sparse_mla_lowp). Until the kernel had register tiles, up to 4 tokens took dsa.sparse_mla_gemv,
    loops Inductor fuses into the graph; with the kernel (and the indexer's) whole mini decode
    graphs now take 0.80-0.87x the time at 1 token, 0.64x at 4 (bench/results/2026-11-30-cpu-tiles.md)."""
    args = (q, kv_cache, indices, block_tables, seq_ids, softmax_scale, v_dim)
    if not q.dtype == kv_cache.dtype == torch.bfloat16:
        return dsa.sparse_mla_lowp(*args)
    return torch.ops.glm5c.sparse_mla_cpu(*args)
