"""The CPU graphs' sparse-MLA kernel (ops/cpu/bf16_kernels.cpp: glm5c_sparse_mla_bf16, through
ops/dsa_cpu.py) against sparse_mla_lowp, whose roundings it keeps, and the fp32 reference: both
dot-product paths, heads past its 8-row chunks, empty slots, the choice by tokens, bad input and
indices outside the cache. (Ragged batches, eager and compiled: tests/test_dsa_triton.py.)"""

from __future__ import annotations

import pytest
import torch

from glm5c.ops import cpu_kernels, dsa, dsa_cpu


def _case(tokens: int = 6, heads: int = 11, dk: int = 72, v_dim: int = 56, topk: int = 20, seed: int = 0):
    """A paged cache of 4 sequences (block size 4) and `tokens` queries, each selecting up to topk of
    its sequence's positions, the rest -1; heads 11 (chunks of 8 and 3), dk 72 (a 32-wide tail)."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(30, 4, dk, generator=g).bfloat16()
    tables = torch.randperm(30, generator=g)[:28].reshape(4, 7).int()  # 28 positions per sequence
    seq_ids = torch.arange(tokens) % 4
    indices = torch.full((tokens, topk), -1, dtype=torch.int32)
    for t in range(tokens):
        chosen = torch.randperm(28, generator=g)[: 3 + 3 * t % topk]
        indices[t, : len(chosen)] = chosen.int()
    q = torch.randn(tokens, heads, dk, generator=g).bfloat16()
    return q, cache, indices, tables, seq_ids, dk**-0.5, v_dim


def _check(got: torch.Tensor, case) -> None:
    q, cache, *_, v_dim = case
    low = dsa.sparse_mla_lowp(*case).float()
    ref = dsa.sparse_mla_ref(*case).float()
    assert got.dtype == torch.bfloat16 and got.shape == (q.shape[0], q.shape[1], v_dim)
    scale = cache[..., :v_dim].float().abs().max()
    assert (got.float() - low).abs().max() <= 2**-7 * scale
    assert (got.float() - ref).abs().max() <= 2**-6 * scale


def test_kernel_matches_lowp_and_the_reference():
    _check(dsa_cpu.sparse_mla_bf16(*_case()), _case())


def test_portable_path(tmp_path, monkeypatch):
    lib = cpu_kernels.open_library(cpu_kernels.build(cache=tmp_path, extra_flags=("-mno-avx512bf16",)))
    assert lib.glm5c_has_avx512bf16() == 0
    monkeypatch.setattr(cpu_kernels, "_lib", lib)
    _check(dsa_cpu.sparse_mla_bf16(*_case(seed=1)), _case(seed=1))


def test_graphs_take_gemv_for_few_tokens_then_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(dsa, "sparse_mla_gemv", lambda *a: calls.append(("gemv", a[0].shape[0])))
    monkeypatch.setattr(torch.ops.glm5c, "sparse_mla_cpu", lambda *a: calls.append(("kernel", a[0].shape[0])) or a[0])
    monkeypatch.setattr(dsa, "sparse_mla_lowp", lambda *a: calls.append(("lowp", a[0].shape[0])))
    for tokens in (4, 5):
        dsa_cpu.sparse_mla(*_case(tokens))
    q, cache, *rest = _case(5)
    dsa_cpu.sparse_mla(q.float(), cache.float(), *rest)
    assert calls == [("gemv", 4), ("kernel", 5), ("lowp", 5)]


def test_bad_input_is_named():
    q, cache, indices, tables, seq_ids, scale, v_dim = _case()
    with pytest.raises(ValueError, match="indices is torch.int64"):
        dsa_cpu.sparse_mla_bf16(q, cache, indices.long(), tables, seq_ids, scale, v_dim)
    with pytest.raises(ValueError, match="shapes do not fit"):
        dsa_cpu.sparse_mla_bf16(q, cache[..., :64], indices, tables, seq_ids, scale, v_dim)
    with pytest.raises(ValueError, match="shapes do not fit"):
        dsa_cpu.sparse_mla_bf16(q, cache, indices, tables, seq_ids, scale, 80)
    indices[2, 0] = 40  # position 40: past the 7 blocks of the table
    with pytest.raises(IndexError, match="outside the block table or the cache"):
        dsa_cpu.sparse_mla_bf16(q, cache, indices, tables, seq_ids, scale, v_dim)
    indices[2, 0] = 1
    tables[seq_ids[2], 0] = 30  # a block number past the cache
    with pytest.raises(IndexError, match="outside the block table or the cache"):
        dsa_cpu.sparse_mla_bf16(q, cache, indices, tables, seq_ids, scale, v_dim)
