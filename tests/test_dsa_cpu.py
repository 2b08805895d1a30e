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
    lib = cpu_kernels.open_library(cpu_kernels.build(cache=tmp_path, extra_flags=("-mno-avx512f",)))
    assert lib.glm5c_has_avx512bf16() == 0
    monkeypatch.setattr(cpu_kernels, "_lib", lib)
    _check(dsa_cpu.sparse_mla_bf16(*_case(seed=1)), _case(seed=1))


def test_graphs_take_the_kernel_for_any_tokens_in_bf16(monkeypatch):
    calls = []
    monkeypatch.setattr(dsa, "sparse_mla_gemv", lambda *a: calls.append(("gemv", a[0].shape[0])))
    monkeypatch.setattr(torch.ops.glm5c, "sparse_mla_cpu", lambda *a: calls.append(("kernel", a[0].shape[0])) or a[0])
    monkeypatch.setattr(dsa, "sparse_mla_lowp", lambda *a: calls.append(("lowp", a[0].shape[0])))
    for tokens in (1, 4, 5):
        dsa_cpu.sparse_mla(*_case(tokens))
    q, cache, *rest = _case(5)
    dsa_cpu.sparse_mla(q.float(), cache.float(), *rest)
    assert calls == [("kernel", 1), ("kernel", 4), ("kernel", 5), ("lowp", 5)]


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


def _indexer_case(tokens: int = 7, heads: int = 5, dim: int = 40, seed: int = 0):
    """A paged index cache of 3 sequences (block size 4, 8 blocks each) and queries at positions
    from 2 to 31, so some see fewer keys than topk and some more."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(30, 4, dim, generator=g).bfloat16()
    tables = torch.randperm(30, generator=g)[:24].reshape(3, 8).int()
    seq_ids = torch.arange(tokens) % 3
    positions = torch.tensor([2, 31, 11, 12, 30, 5, 20, 25, 9][:tokens])
    q = torch.randn(tokens, heads, dim, generator=g)
    weights = torch.randn(tokens, heads, generator=g)
    return q, weights, cache, tables, seq_ids, positions


@pytest.mark.parametrize("portable", [False, True], ids=["avx512bf16", "portable"])
def test_indexer_topk_kernel_picks_the_references_keys(portable, tmp_path, monkeypatch):
    """The same set of positions as indexer_topk_ref (order within a row is unspecified): all the
    visible ones when there are at most topk, else those with the topk best scores."""
    if portable:
        monkeypatch.setattr(cpu_kernels, "_lib", cpu_kernels.open_library(
            cpu_kernels.build(cache=tmp_path, extra_flags=("-mno-avx512f",))))  # fmt: skip
    case = _indexer_case()
    topk = 12
    got = dsa_cpu.indexer_topk_bf16(*case, topk)
    want = dsa.indexer_topk_ref(*case, topk)
    scores = dsa.indexer_scores_ref(*case)
    assert got.dtype == torch.int32 and got.shape == want.shape
    for t in range(got.shape[0]):
        g_row, w_row = sorted(got[t].tolist()), sorted(want[t].tolist())
        if case[5][t] + 1 <= topk:
            assert g_row == w_row == [-1] * (topk - case[5][t].item() - 1) + list(range(case[5][t].item() + 1))
        else:  # the chosen scores are the best topk (compared as values: robust to ties)
            assert -1 not in g_row
            best = scores[t].topk(topk).values
            assert torch.allclose(scores[t][got[t].long()].sort().values, best.sort().values, rtol=1e-5, atol=1e-5)


def test_graphs_take_the_indexer_kernel_for_a_bf16_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.glm5c, "indexer_topk_cpu", lambda *a: calls.append("kernel"))
    monkeypatch.setattr(dsa, "indexer_topk_ref", lambda *a: calls.append("ref"))
    q, weights, cache, tables, seq_ids, positions = _indexer_case()  # 7 tokens
    dsa_cpu.indexer_topk(q, weights, cache, tables, seq_ids, positions, 8)
    dsa_cpu.indexer_topk(q[:1], weights[:1], cache, tables, seq_ids[:1], positions[:1], 8)  # 1 token
    dsa_cpu.indexer_topk(q, weights, cache.float(), tables, seq_ids, positions, 8)  # an fp32 cache
    dsa_cpu.indexer_topk(q, weights, cache.to(torch.float8_e4m3fn), tables, seq_ids, positions, 8,
                         torch.ones(30, 4))  # an FP8 cache with its scales  # fmt: skip
    assert calls == ["kernel", "kernel", "ref", "ref"]


def test_indexer_bad_input_is_named():
    q, weights, cache, tables, seq_ids, positions = _indexer_case()
    with pytest.raises(ValueError, match="q is torch.bfloat16"):
        dsa_cpu.indexer_topk_bf16(q.bfloat16(), weights, cache, tables, seq_ids, positions, 8)
    with pytest.raises(ValueError, match="shapes do not fit"):
        dsa_cpu.indexer_topk_bf16(q, weights[:, :2], cache, tables, seq_ids, positions, 8)
    positions[1] = 32  # past the 8 blocks of 4
    with pytest.raises(IndexError, match="outside the block table or the cache"):
        dsa_cpu.indexer_topk_bf16(q, weights, cache, tables, seq_ids, positions, 8)
    with pytest.raises(IndexError, match="outside the block table or the cache"):
        torch.ops.glm5c.indexer_topk_cpu(q, weights, cache, tables, seq_ids, positions, 8)
