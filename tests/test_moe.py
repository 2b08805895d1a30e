"""MoE reference ops: routing against transformers' router, and the shape-static expert paths
(grouped GEMM, dense batched GEMMs, per-pair gathered experts) against the per-expert loop,
under skewed loads and expert parallelism."""

from __future__ import annotations

import pytest
import torch

from glm5c.ops import linear_ref, moe

NO_SCALES = (None, None, None)


def _experts(n: int, d: int = 32, i: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, i, d, generator=g) * 0.1, torch.randn(n, i, d, generator=g) * 0.1,
            torch.randn(n, d, i, generator=g) * 0.1)  # fmt: skip


SHAPE_STATIC = [moe.experts_grouped_mm, moe.experts_dense, moe.experts_gathered]


@pytest.mark.parametrize("op", SHAPE_STATIC, ids=lambda op: op.__name__)
@pytest.mark.parametrize(
    "case", ["random", "all_to_one_expert", "empty_experts", "more_experts_than_tokens", "one_token", "many_tokens"]
)
def test_shape_static_experts_match_loop(case, op):
    n_experts, top_k = 16, 4
    tokens = {"more_experts_than_tokens": 3, "one_token": 1, "many_tokens": 300}.get(case, 40)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 32, generator=g)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(tokens)])
    if case == "all_to_one_expert":
        ids[:, 0] = 5  # every token's first choice is expert 5
    if case == "empty_experts":
        ids = ids % 4  # experts 4..15 get nothing (and pairs repeat experts)
    weights = torch.rand(tokens, top_k, generator=g)
    w = _experts(n_experts)
    want = moe.experts_ref(x, ids, weights, *w, NO_SCALES, 0, linear_ref)
    got = op(x, ids, weights, *w, NO_SCALES, 0, linear_ref)
    assert (got - want).abs().max() < 1e-5


def test_expert_parallel_shards_sum_to_the_whole():
    """Each rank computes only its experts; the sum over ranks (the all-reduce) is the full layer."""
    g = torch.Generator().manual_seed(2)
    x, ids, weights = torch.randn(9, 32, generator=g), torch.randint(0, 16, (9, 4), generator=g), torch.rand(9, 4)
    w = _experts(16)
    full = moe.experts_ref(x, ids, weights, *w, NO_SCALES, 0, linear_ref)
    for op in (moe.experts_ref, *SHAPE_STATIC):
        shards = [op(x, ids, weights, *(t[r * 4 : r * 4 + 4] for t in w), NO_SCALES, r * 4, linear_ref)
                  for r in range(4)]  # fmt: skip
        assert (sum(shards) - full).abs().max() < 1e-5


@pytest.mark.parametrize("op", SHAPE_STATIC, ids=lambda op: op.__name__)
def test_shape_static_paths_refuse_fp8_weights(op):
    w = _experts(2)
    with pytest.raises(ValueError, match="keep_fp8=False"):
        op(torch.randn(1, 32), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), *w, (torch.ones(2, 1, 1), None, None),
           0, linear_ref)  # fmt: skip


def test_gathered_experts_compiled_bf16_match_the_loop():
    """The form experts_gathered is for: compiled, BF16 (the expert picked inside the fused loop)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, generator=g).bfloat16()
    ids, weights = torch.tensor([[3, 9, 3, 15], [0, 1, 2, 3]]), torch.rand(2, 4, generator=g)
    w = tuple(t.bfloat16() for t in _experts(16))
    want = moe.experts_ref(x, ids, weights, *w, NO_SCALES, 0, linear_ref).float()
    got = torch.compile(moe.experts_gathered, fullgraph=True)(x, ids, weights, *w, NO_SCALES, 0, linear_ref).float()
    assert (got - want).abs().max() <= 2**-7 * want.abs().max()


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_routing_matches_transformers(n_group, topk_group):
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaTopkRouter

    cfg = GlmMoeDsaConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
                          topk_group=topk_group, routed_scaling_factor=2.5)  # fmt: skip
    router = GlmMoeDsaTopkRouter(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.5)
    x = torch.randn(20, 32, generator=g)
    _, want_w, want_ids = router(x)
    got_w, got_ids = moe.route_ref(x, router.weight, router.e_score_correction_bias, 4, n_group, topk_group, True, 2.5)
    # same experts per token (order within a token is unspecified), same weight for each
    want = torch.zeros(20, 16).scatter(1, want_ids, want_w)
    got = torch.zeros(20, 16).scatter(1, got_ids, got_w)
    assert torch.equal(want != 0, got != 0)
    assert (want - got).abs().max() < 1e-6
