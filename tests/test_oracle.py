"""The model against transformers' GlmMoeDsaForCausalLM (>= 5.13), the numerical oracle, in float32:
the tiny preset and two other random configs (one with several `shared` indexer layers), prompts
shorter and longer than index_topk, and greedy generation."""

from __future__ import annotations

import pytest
import torch

from glm5c.weights import build_model

from .conftest import forward_all, load_oracle

TOL = 1e-4


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(22, min(vocab, 1300), (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("ckpt", ["tiny_dir", "config_b_dir", "config_c_dir"])
def test_logits_match_transformers(ckpt, request):
    model_dir = request.getfixturevalue(ckpt)
    model, oracle = build_model(model_dir, dtype=torch.float32), load_oracle(model_dir)
    topk = model.config.index_topk
    # shorter than, equal to and well past index_topk: the last ones run truly sparse attention
    prompts = _prompts(model.config.vocab_size, [3, topk, topk + 5, 4 * topk + 3], seed=7)
    ours = forward_all(model, prompts)  # all prompts in one flat step
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            want = oracle(torch.tensor([ids])).logits[0].float()
        err = (got - want).abs().max().item()
        assert err <= TOL, f"{ckpt}: prompt of {len(ids)} tokens, max abs logit error {err:.2e}"


def test_sparse_path_is_exercised(tiny_dir):
    """Past index_topk the indexer's choice changes the logits (so the match above is meaningful)."""
    model = build_model(tiny_dir, dtype=torch.float32)
    ids = _prompts(model.config.vocab_size, [4 * model.config.index_topk], seed=3)
    sparse = forward_all(model, ids)[0]
    for layer in [*model.layers, model.mtp]:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.topk = len(ids[0])  # keeps every visible key: dense MLA
    dense = forward_all(model, ids)[0]
    k = model.config.index_topk
    assert torch.allclose(sparse[:k], dense[:k], atol=1e-5)  # no-op while the context fits
    assert (sparse[k:] - dense[k:]).abs().max() > 1e-2


@pytest.mark.parametrize("ckpt", ["tiny_dir", "config_c_dir"])
def test_greedy_generation_matches_transformers(ckpt, request):
    from glm5c import LLM, SamplingParams

    model_dir = request.getfixturevalue(ckpt)
    llm, oracle = LLM(model_dir, dtype="float32"), load_oracle(model_dir)
    prompts = _prompts(llm.config.vocab_size, [2, 9, 15, 40], seed=11)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            want = oracle.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
        assert out.token_ids == want[0, len(ids) :].tolist(), f"prompt of {len(ids)} tokens diverges"
        assert out.finish_reason == "length"
