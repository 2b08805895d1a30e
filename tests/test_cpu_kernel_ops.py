"""The CPU kernels' C++ op implementations (ops/cpu/bf16_ops.cpp, registered by cpu_kernels.load):
what a compiled graph calls. Bit-equal to the same kernels through Python and ctypes, and bad
input is a clear error from the op itself."""

from __future__ import annotations

import pytest
import torch

from glm5c.ops import cpu_kernels, cpu_linear, dsa_cpu, moe_cpu


@pytest.fixture(scope="module", autouse=True)
def native_ops():
    assert cpu_kernels.load() is not None
    if cpu_kernels._ops_loaded is not True:
        pytest.fail(f"the C++ ops did not load: {cpu_kernels._ops_loaded}")


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_linear_op_is_the_kernel():
    kv_b = _bf16(3, 40, 48, seed=5)
    for x, w in ((_bf16(7, 96, seed=1), _bf16(40, 96, seed=2)), (_bf16(9, 3, 64, seed=3), _bf16(3, 24, 64, seed=4)),
                 (_bf16(6, 3, 30, seed=6)[..., :24], kv_b[:, :24].transpose(1, 2)),  # views: x @ W in place
                 (_bf16(6, 3, 48, seed=7), kv_b[:, 24:]), (_bf16(6, 40, seed=8), _bf16(40, 20, seed=9).t())):
        assert torch.equal(torch.ops.glm5c.linear_bf16_cpu(x, w), cpu_linear.linear_bf16(x, w))
    with pytest.raises(RuntimeError, match=r"linear_bf16_cpu: x is Float \[5, 16\] on cpu, expected a 2-d BFloat16"):
        torch.ops.glm5c.linear_bf16_cpu(torch.randn(5, 16), _bf16(8, 16, seed=0))
    with pytest.raises(RuntimeError, match=r"x \[5, 16\] does not fit weight \[8, 12\]"):
        torch.ops.glm5c.linear_bf16_cpu(_bf16(5, 16, seed=0), _bf16(8, 12, seed=0))


def test_experts_op_is_the_kernel():
    g = torch.Generator().manual_seed(0)
    x = _bf16(11, 64, seed=5)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(11)])
    weights = torch.rand(11, 2, generator=g)
    stacks = (_bf16(8, 32, 64, seed=6), _bf16(8, 32, 64, seed=7), _bf16(8, 64, 32, seed=8))
    got = torch.ops.glm5c.moe_experts_cpu(x, ids, weights, *stacks, 0)
    assert torch.equal(got, moe_cpu.experts_bf16(x, ids, weights, *stacks, 0))
    with pytest.raises(RuntimeError, match="moe_experts_cpu: expert_ids is Int"):
        torch.ops.glm5c.moe_experts_cpu(x, ids.int(), weights, *stacks, 0)
    with pytest.raises(RuntimeError, match="moe_experts_cpu: shapes do not fit"):
        torch.ops.glm5c.moe_experts_cpu(x, ids, weights, stacks[0], stacks[0], stacks[0], 0)


def test_sparse_mla_op_is_the_kernel():
    g = torch.Generator().manual_seed(1)
    cache = _bf16(10, 4, 40, seed=9)
    tables = torch.randperm(10, generator=g)[:8].reshape(2, 4).int()
    seq_ids = torch.tensor([0, 1, 1, 0, 1])
    indices = torch.randint(0, 16, (5, 6), generator=g).int()
    indices[1, 3:] = -1
    q = _bf16(5, 9, 40, seed=10)
    got = torch.ops.glm5c.sparse_mla_cpu(q, cache, indices, tables, seq_ids, 0.2, 32)
    assert torch.equal(got, dsa_cpu.sparse_mla_bf16(q, cache, indices, tables, seq_ids, 0.2, 32))
    indices[0, 0] = 16  # past the 4 blocks of 4
    with pytest.raises(IndexError, match="outside the block table or the cache"):
        torch.ops.glm5c.sparse_mla_cpu(q, cache, indices, tables, seq_ids, 0.2, 32)


def test_indexer_topk_op_is_the_kernel():
    g = torch.Generator().manual_seed(2)
    cache = _bf16(12, 4, 32, seed=11)
    tables = torch.randperm(12, generator=g)[:12].reshape(2, 6).int()
    seq_ids, positions = torch.tensor([0, 1, 1]), torch.tensor([23, 4, 17])
    q, weights = torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, generator=g)
    got = torch.ops.glm5c.indexer_topk_cpu(q, weights, cache, tables, seq_ids, positions, 8)
    assert torch.equal(got, dsa_cpu.indexer_topk_bf16(q, weights, cache, tables, seq_ids, positions, 8))
    with pytest.raises(RuntimeError, match="indexer_topk_cpu: positions is Int"):
        torch.ops.glm5c.indexer_topk_cpu(q, weights, cache, tables, seq_ids, positions.int(), 8)


def test_route_op_is_the_kernel():
    g = torch.Generator().manual_seed(3)
    x, gate, bias = _bf16(9, 40, seed=12), torch.randn(16, 40, generator=g), torch.randn(16, generator=g)
    got = torch.ops.glm5c.route_cpu(x, gate, bias, 4, 4, 2, True, 2.5)
    want = moe_cpu.route_bf16(x, gate, bias, 4, 4, 2, True, 2.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="route_cpu: gate_weight is BFloat16"):
        torch.ops.glm5c.route_cpu(x, gate.bfloat16(), bias, 4, 4, 2, True, 2.5)
    with pytest.raises(RuntimeError, match="route_cpu: top_k 4, n_group 5, topk_group 2 do not fit 16 experts"):
        torch.ops.glm5c.route_cpu(x, gate, bias, 4, 5, 2, True, 2.5)


def test_random_shapes_match_the_references():
    """120 random shapes through the ops a compiled graph calls, against torch: widths past and
    short of every tile and chunk size, views (strided heads, transposed weights), empty slots,
    zero tokens. Relative to each result's largest value, within 2^-6 (BF16 outputs)."""
    import random

    import torch.nn.functional as F

    from glm5c.ops import dsa, linear_ref, moe

    rng = random.Random(0)
    torch.manual_seed(0)

    def bf(*shape):
        return torch.randn(*shape).bfloat16()

    for case in range(120):
        kind = ("linear", "transposed", "heads", "experts", "attention")[case % 5]
        if kind == "linear":
            x, w = bf(rng.randint(0, 80), k := rng.randint(1, 300)), bf(rng.randint(1, 90), k)
            got, want = torch.ops.glm5c.linear_bf16_cpu(x, w), F.linear(x, w)
        elif kind == "transposed":
            x, w_t = bf(rng.randint(0, 20), k := rng.randint(1, 150)), bf(k, rng.randint(1, 90))
            got, want = torch.ops.glm5c.linear_bf16_cpu(x, w_t.t()), F.linear(x, w_t.t())
        elif kind == "heads":
            t, h, k, n = rng.randint(0, 40), rng.randint(1, 9), rng.randint(1, 100), rng.randint(1, 70)
            w = bf(h, n + 3, k + 5)[:, 1 : n + 1, :k] if case % 2 else bf(h, k, n).transpose(1, 2)
            x = bf(t, h, k + 7)[..., 2 : k + 2]
            got = torch.ops.glm5c.linear_bf16_cpu(x, w)
            want = torch.bmm(x.transpose(0, 1).float(), w.transpose(1, 2).float()).transpose(0, 1).bfloat16()
        elif kind == "experts":
            t, e, d, i = rng.randint(0, 100), rng.randint(1, 12), rng.randint(1, 200), rng.randint(1, 100)
            k = rng.randint(1, e)
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
            x, weights, stacks = bf(t, d), torch.rand(t, k), (bf(e, i, d) * 0.2, bf(e, i, d) * 0.2, bf(e, d, i) * 0.2)
            got = torch.ops.glm5c.moe_experts_cpu(x, ids, weights, *stacks, 0)
            want = moe.experts_ref(x, ids, weights, *stacks, (None, None, None), 0, linear_ref)
        else:
            t, h, dk, topk = rng.randint(1, 12), rng.randint(1, 12), rng.randint(2, 200), rng.randint(1, 40)
            v = rng.randint(1, dk)
            cache, tables, seq_ids = bf(12, 4, dk), torch.randperm(12)[:10].reshape(2, 5).int(), torch.randint(0, 2, (t,))
            indices = torch.full((t, topk), -1, dtype=torch.int32)
            for row in indices:
                chosen = torch.randperm(20)[: rng.randint(0, min(topk, 20))]
                row[: len(chosen)] = chosen.int()
            q = bf(t, h, dk)
            got = torch.ops.glm5c.sparse_mla_cpu(q, cache, indices, tables, seq_ids, dk**-0.5, v)
            want = dsa.sparse_mla_lowp(q, cache, indices, tables, seq_ids, dk**-0.5, v)
            want = torch.where((indices < 0).all(1)[:, None, None], 0, want)  # no entries: zeros (the kernel's)
        assert got.shape == want.shape and got.dtype == torch.bfloat16, (kind, case)
        if want.numel():
            scale = want.float().abs().max().clamp_min(1e-6)
            assert (got.float() - want.float()).abs().max() <= 2**-6 * scale, (kind, case)
