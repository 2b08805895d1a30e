"""The batched sampler (glm5c/sampling.py), its counter-based noise (glm5c/noise.py) and the
speculative-decoding rejection sampler (glm5c/rejection.py): filters, penalties, logprobs,
seeding, batch independence, and chi-square tests that sampled frequencies follow the intended
distribution. Every random draw is seeded: the tests are deterministic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from glm5c.noise import uniform
from glm5c.rejection import rejection_sample
from glm5c.sampling import SamplingBatch, SamplingParams, argmax_tokens, sample, sampling_probs

from .chi_square import chi2_sf, chi_square_p

P_MIN = 1e-3  # chi-square p-value threshold


def _batch(params, vocab, outputs=None, prompts=None, positions=None, device="cpu") -> SamplingBatch:
    n = len(params)
    outputs = outputs or [[] for _ in range(n)]
    prompts = prompts or [[0] for _ in range(n)]
    positions = positions if positions is not None else [len(p) + len(o) for p, o in zip(prompts, outputs)]
    return SamplingBatch.from_params(params, outputs, prompts, positions, vocab, device)


def _logits(n: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- greedy, filters -----------------------------------------------------------------------------


def test_greedy_is_argmax():
    """Greedy rows take the argmax, also beside sampled rows in the same batch."""
    logits = _logits(16, 1000, 0)
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(seed=i) for i in range(16)]
    tokens = sample(logits, _batch(params, 1000)).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(-1))


def test_argmax_tokens_is_torch_argmax():
    """The engine's greedy path (numpy on a CPU): first index on ties, NaN the largest, as torch."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g)
    logits[1, [7, 200]] = 50.0  # a tie
    logits[2, 5] = float("nan")
    logits[3, [9, 11]] = float("inf")
    logits[4] = 0.0  # all equal
    with torch.inference_mode():
        inference = logits.clone()
    assert argmax_tokens(logits) == argmax_tokens(inference) == logits.argmax(-1).tolist() == [
        logits[0].argmax().item(), 7, 5, 9, 0, logits[5].argmax().item()]
    assert argmax_tokens(logits[:0]) == []
    bf16 = logits.bfloat16()  # (not numpy's: torch's argmax)
    assert argmax_tokens(bf16) == bf16.argmax(-1).tolist()


def test_argmax_only():
    assert SamplingParams(temperature=0.0).argmax_only
    assert not SamplingParams(temperature=0.5).argmax_only
    assert not SamplingParams(temperature=0.0, repetition_penalty=1.2).argmax_only
    assert not SamplingParams(temperature=0.0, logprobs=0).argmax_only
    p = SamplingParams(temperature=0.0)
    assert p.argmax_only and p == SamplingParams(temperature=0.0) and hash(p) == hash(SamplingParams(temperature=0.0))


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_reduce_to_greedy(filters):
    """top_k=1, a tiny top_p and min_p=1 keep only the most likely token."""
    logits = _logits(64, 1000, 1, scale=0.5)
    params = [SamplingParams(temperature=1.5, seed=s, **filters) for s in range(64)]
    assert torch.equal(sample(logits, _batch(params, 1000)).token_ids, logits.argmax(-1))


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])  # sorted; logits below are shuffled


@pytest.mark.parametrize(
    "filters, kept",
    [
        (dict(top_k=3), 3),
        (dict(top_k=7), 7),
        (dict(top_p=0.6), 2),  # mass before rank 2 is 0.65
        (dict(top_p=0.7), 3),
        (dict(min_p=0.3), 3),  # p >= 0.12
        (dict(min_p=0.5), 2),  # p >= 0.2
        (dict(top_k=4, top_p=0.8), 3),  # top-p on the top-4 renormalized: 0.44, 0.72, 0.89
        (dict(top_k=3, min_p=0.5), 2),
    ],
)
def test_filter_sets(filters, kept):
    """Each filter keeps the intended tokens, renormalized; sampled tokens stay inside the set."""
    order = torch.randperm(len(PROBS), generator=torch.Generator().manual_seed(2))
    logits = PROBS.log()[order.argsort()].expand(200, -1)  # token order[i] has probability PROBS[i]
    params = [SamplingParams(temperature=1.0, seed=s, **filters) for s in range(200)]
    batch = _batch(params, len(PROBS))
    expected = torch.zeros(len(PROBS))
    expected[order[:kept]] = PROBS[:kept] / PROBS[:kept].sum()
    torch.testing.assert_close(sampling_probs(logits, batch), expected.expand(200, -1))
    assert set(sample(logits, batch).token_ids.tolist()) == set(order[:kept].tolist())


# ---- penalties -----------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
PROMPT, OUTPUT = [0, 1], [1, 3, 3]  # token 0: prompt only; 1: prompt and output once; 3: output twice


@pytest.mark.parametrize(
    "penalties, expected",
    [
        (dict(repetition_penalty=2.0), [1.0, -2.0, 0.5, 1.5, -2.0, 1.0]),  # prompt and output tokens
        (dict(repetition_penalty=0.5), [4.0, -0.5, 0.5, 6.0, -2.0, 1.0]),
        (dict(frequency_penalty=0.5), [2.0, -1.5, 0.5, 2.0, -2.0, 1.0]),  # output tokens, per occurrence
        (dict(frequency_penalty=-1.0), [2.0, 0.0, 0.5, 5.0, -2.0, 1.0]),
        (dict(presence_penalty=0.25), [2.0, -1.25, 0.5, 2.75, -2.0, 1.0]),  # output tokens, once
        (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
         [1.0, -2.75, 0.5, 0.25, -2.0, 1.0]),
    ],
)  # fmt: skip
def test_penalties(penalties, expected):
    """Penalties move exactly the intended logits by the intended amounts (seen through the logprobs)."""
    params = [SamplingParams(temperature=0.0, logprobs=6, **penalties)]
    result = sample(LOGITS, _batch(params, 6, outputs=[OUTPUT], prompts=[PROMPT]))
    logprobs = torch.empty(1, 6).scatter_(1, result.top_ids, result.top_logprobs)
    torch.testing.assert_close(logprobs, torch.tensor([expected]).log_softmax(-1))
    assert result.token_ids.item() == torch.tensor(expected).argmax()  # greedy after penalties


def test_penalties_skip_rows_without_them():
    """In a batch where one row is penalized, the others' logprobs are unchanged, bit for bit."""
    params = [SamplingParams(temperature=0.7, seed=1, logprobs=6), SamplingParams(repetition_penalty=3.0)]
    both = sample(LOGITS.expand(2, -1), _batch(params, 6, outputs=[OUTPUT] * 2, prompts=[PROMPT] * 2))
    alone = sample(LOGITS, _batch(params[:1], 6, outputs=[OUTPUT], prompts=[PROMPT]))
    assert torch.equal(both.top_logprobs[:1], alone.top_logprobs)


# ---- logprobs ------------------------------------------------------------------------------------


def test_logprobs_are_of_penalized_tempered_logits():
    """Chosen and top-n logprobs are log_softmax(penalized logits / temperature), before the
    top-k/top-p/min-p masks; top-n is sorted; n is the largest asked for."""
    logits = _logits(4, 50, 3)
    params = [
        SamplingParams(temperature=0.7, seed=5, logprobs=5, presence_penalty=1.0),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.3, seed=6, top_k=3, min_p=0.2),
        SamplingParams(temperature=0.5, seed=7, top_p=0.5, logprobs=0),
    ]
    outputs = [[4, 4, 9], [4], [], [1]]
    result = sample(logits, _batch(params, 50, outputs=outputs))
    penalized = logits.clone()
    penalized[0, [4, 9]] -= 1.0
    expected = (penalized / torch.tensor([[0.7], [1.0], [1.3], [0.5]])).log_softmax(-1)
    torch.testing.assert_close(result.logprobs, expected.gather(1, result.token_ids[:, None])[:, 0])
    top = expected.topk(5)
    assert result.top_logprobs.shape == (4, 5)
    torch.testing.assert_close(result.top_logprobs, top.values)
    assert torch.equal(result.top_ids, top.indices)
    assert (result.top_logprobs.diff(dim=-1) <= 0).all()


@pytest.mark.parametrize("asked", [None, 0])
def test_no_top_logprobs_unless_asked(asked):
    result = sample(_logits(2, 50, 4), _batch([SamplingParams(seed=1, logprobs=asked)] * 2, 50))
    assert result.top_logprobs is None and result.top_ids is None
    # logprobs=0: the chosen token's logprob only; None: no logprobs at all (no log-softmax computed)
    assert result.logprobs is None if asked is None else result.logprobs.shape == (2,)


# ---- seeds ---------------------------------------------------------------------------------------


def test_same_seed_same_tokens_in_any_batch():
    """A seeded request's tokens and logprobs over 24 steps are identical alone and as row 3 of a
    batch of 8 whose other rows use every other feature (greedy, penalties, filters, no seed)."""
    me = SamplingParams(temperature=0.9, top_p=0.9, seed=42, logprobs=3)
    others = [
        SamplingParams(temperature=0.0), SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(top_k=5, logprobs=7), SamplingParams(temperature=1.3),
        SamplingParams(min_p=0.1, seed=43), SamplingParams(seed=42, temperature=0.5),
        SamplingParams(seed=42, presence_penalty=-1.0),
    ]  # fmt: skip
    mine, output = [], [5, 6]
    for step in range(24):
        logits = _logits(8, 300, 100 + step)
        alone = sample(logits[3:4], _batch([me], 300, outputs=[output], prompts=[[1, 2]]))
        params = others[:3] + [me] + others[3:]
        batched = sample(logits, _batch(params, 300, outputs=[output] * 8, prompts=[[1, 2]] * 8))
        assert torch.equal(alone.token_ids, batched.token_ids[3:4])
        assert torch.equal(alone.logprobs, batched.logprobs[3:4])
        assert torch.equal(alone.top_logprobs, batched.top_logprobs[3:4, :3])
        mine.append(alone.token_ids.item())
        output.append(mine[-1])
    assert len(set(mine)) > 12  # it really sampled


def test_different_seeds_differ():
    logits = _logits(32, 1000, 5, scale=0.5)

    def tokens(seed):
        return sample(logits, _batch([SamplingParams(seed=seed)] * 32, 1000, positions=list(range(32)))).token_ids

    assert torch.equal(tokens(1), tokens(1))
    assert (tokens(1) != tokens(2)).sum() > 28
    assert torch.equal(tokens(3), tokens(3 + 2**64))  # seeds are taken mod 2**64
    assert torch.equal(tokens(-1), tokens(2**64 - 1))


def test_unseeded_requests_draw_fresh_seeds():
    params = [SamplingParams(), SamplingParams(seed=9), SamplingParams()]
    a, b = _batch(params, 10), _batch(params, 10)
    assert a.seeds[1] == b.seeds[1] == 9
    assert a.seeds[0] != b.seeds[0] and a.seeds[0] != a.seeds[2]


def test_noise_is_splitmix64():
    """The int64 tensor hash equals SplitMix64 computed with Python integers mod 2**64."""
    mask = 2**64 - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    def ref(seed, position, i, stream):
        key = mix((mix((mix(seed & mask) + stream) & mask) + position) & mask)
        return (mix((key + (i + 1) * 0x9E3779B97F4A7C15) & mask) >> 41) * 2.0**-23 + 2.0**-24

    seeds = [0, 1, -1, 2**62 + 12345, -(2**63), 2**63 - 1]
    positions = [0, 7, 10**9, 5, 2**40, 3]
    got = uniform(torch.tensor(seeds), torch.tensor(positions), 4, stream=2)
    expected = [[ref(s, p, i, 2) for i in range(4)] for s, p in zip(seeds, positions)]
    assert got.tolist() == expected
    assert 0.0 < got.min() and got.max() < 1.0


def test_no_host_syncs():
    """On meta tensors any read of a tensor value (.item(), bool(), .tolist()) raises: the sampler,
    sampling_probs and the rejection sampler run without one, as a captured CUDA graph needs."""
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=5, top_p=0.5, min_p=0.1, logprobs=3,
                                                               repetition_penalty=1.2, seed=1)]  # fmt: skip
    batch = _batch(params, 100, outputs=[[1, 2], [3]], device="meta")
    logits = torch.empty(2, 100, device="meta")
    result = sample(logits, batch)
    assert result.token_ids.shape == (2,) and result.top_ids.shape == (2, 3)
    assert sampling_probs(logits, batch).shape == (2, 100)
    accepted, out = rejection_sample(torch.empty(2, 4, 100, device="meta"), torch.empty(2, 3, 100, device="meta"),
                                     torch.empty(2, 3, dtype=torch.int64, device="meta"), batch.greedy, batch.seeds,
                                     batch.positions)  # fmt: skip
    assert accepted.shape == (2,) and out.shape == (2, 4)


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("repetition_penalty", True),
        ("repetition_penalty", "1"),
        ("presence_penalty", 2.5),
        ("presence_penalty", -3),
        ("presence_penalty", math.nan),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", True),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", 1.0),
        ("logprobs", True),
    ],
)
def test_bad_sampling_params(field, value):
    """(The older fields are covered in tests/test_llm.py.)"""
    with pytest.raises(ValueError, match=f"^SamplingParams.{field}="):
        SamplingParams(**{field: value})


def test_boundary_params_are_valid():
    SamplingParams(repetition_penalty=1e-3, presence_penalty=-2, frequency_penalty=2.0, logprobs=20)
    SamplingParams(logprobs=0, top_k=10**9)  # top_k beyond the vocab = off


def test_from_params_checks_lengths():
    with pytest.raises(ValueError, match="2 params, 1 outputs, 2 prompts and 2 positions"):
        SamplingBatch.from_params([SamplingParams()] * 2, [[]], [[1], [1]], [1, 1], 10, "cpu")
    with pytest.raises(ValueError, match="vocab_size=0"):
        SamplingBatch.from_params([SamplingParams()], [[]], [[1]], [1], 0, "cpu")


# ---- distributions -------------------------------------------------------------------------------


def test_chi2_sf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 7, 30):
        for x in (0.01, 1.0, 6.5, 20.0, 60.0):
            assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-10, abs=1e-300)


V8 = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.25, 1.5])
DRAWS = 20_000


@pytest.mark.parametrize("across", ["seeds", "positions"])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=6, top_p=0.9, min_p=0.08,
                                                     presence_penalty=0.5)],
)  # fmt: skip
def test_sample_distribution(params, across, record_property):
    """20k draws (20k seeds at one position, or one seed at 20k positions) fit the intended
    distribution: softmax(logits / T), or the filtered one that sampling_probs reports."""
    seeds = list(range(DRAWS)) if across == "seeds" else [12345] * DRAWS
    positions = [7] * DRAWS if across == "seeds" else list(range(DRAWS))
    rows = [dataclasses.replace(params, seed=s) for s in seeds]
    batch = _batch(rows, 8, outputs=[[4]] * DRAWS, positions=positions)
    logits = V8.expand(DRAWS, -1)
    expected = sampling_probs(logits[:1], batch)[0]
    if params.top_k == 0:
        torch.testing.assert_close(expected, (V8 / 0.7).softmax(-1))
    else:
        assert (expected == 0).sum() >= 2  # the filters removed something
    counts = torch.bincount(sample(logits, batch).token_ids, minlength=8)
    p = chi_square_p(counts, expected)
    record_property("p_value", p)
    assert p > P_MIN, (counts, expected * DRAWS)


# ---- rejection sampling --------------------------------------------------------------------------

# Target p at 3 slots, draft q at 2, on 6 tokens; q puts mass where p has none and vice versa.
TARGET = torch.tensor([
    [0.30, 0.25, 0.20, 0.15, 0.10, 0.00],
    [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
    [0.10, 0.20, 0.30, 0.10, 0.20, 0.10],
])  # fmt: skip
DRAFT = torch.tensor([
    [0.05, 0.10, 0.40, 0.05, 0.00, 0.40],
    [0.40, 0.20, 0.10, 0.10, 0.10, 0.10],
])  # fmt: skip
TRIALS = 40_000


@pytest.fixture(scope="module")
def speculated():
    """TRIALS independent verifications (one per row, each its own seed) of drafts drawn from DRAFT."""
    drafts = torch.stack([torch.multinomial(q, TRIALS, replacement=True, generator=torch.Generator().manual_seed(j))
                          for j, q in enumerate(DRAFT)], dim=1)  # fmt: skip # [TRIALS, 2]
    seeds, positions = torch.arange(TRIALS), torch.full((TRIALS,), 50)
    greedy = torch.zeros(TRIALS, dtype=torch.bool)
    accepted, out = rejection_sample(TARGET.expand(TRIALS, -1, -1), DRAFT.expand(TRIALS, -1, -1), drafts, greedy,
                                     seeds, positions)  # fmt: skip
    return drafts, accepted, out


def test_rejection_output_layout(speculated):
    """Accepted drafts come first, then one target token, then -1; a few rows alone give the same."""
    drafts, accepted, out = speculated
    slots = torch.arange(3)
    assert torch.equal(torch.where(slots[:2] < accepted[:, None], out[:, :2], drafts), drafts)
    assert ((out >= 0) == (slots <= accepted[:, None])).all()
    few = rejection_sample(TARGET.expand(5, -1, -1), DRAFT.expand(5, -1, -1), drafts[10:15],
                           torch.zeros(5, dtype=torch.bool), torch.arange(10, 15), torch.full((5,), 50))  # fmt: skip
    assert torch.equal(few[0], accepted[10:15]) and torch.equal(few[1], out[10:15])


@pytest.mark.parametrize("slot", [0, 1, 2])
def test_rejection_keeps_target_distribution(speculated, slot, record_property):
    """The token at slot j, among trials that accepted the drafts before it, is distributed as the
    target's p_j: the first token, the token after an accepted draft, and the bonus token."""
    _, accepted, out = speculated
    reached = accepted >= slot
    counts = torch.bincount(out[reached, slot], minlength=6)
    p = chi_square_p(counts, TARGET[slot])
    record_property("p_value", p)
    record_property("trials", int(reached.sum()))
    assert p > P_MIN, (counts, TARGET[slot] * reached.sum())


@pytest.mark.parametrize("slot", [0, 1])
def test_acceptance_rate(speculated, slot, record_property):
    """Among trials reaching slot j, drafts are accepted at rate sum(min(p_j, q_j)) (5 sigma)."""
    _, accepted, _ = speculated
    reached = accepted >= slot
    rate = float((accepted[reached] > slot).float().mean())
    expected = float(torch.minimum(TARGET[slot], DRAFT[slot]).sum())
    sigma = math.sqrt(expected * (1 - expected) / int(reached.sum()))
    record_property("acceptance", rate)
    assert abs(rate - expected) < 5 * sigma, (rate, expected)


def test_rejection_greedy_rows():
    """Greedy rows accept while the draft is the target's argmax, then emit the target's argmax,
    whatever the draft probabilities say."""
    target = F.one_hot(torch.tensor([[2, 4, 1], [2, 4, 1], [2, 4, 1]]), 6).float() * 0.5 + 0.05  # [3, 3, 6]
    drafts = torch.tensor([[2, 4], [2, 0], [3, 4]])
    draft_probs = F.one_hot(drafts, 6).float()  # a stochastic row would accept these often or always
    accepted, out = rejection_sample(target, draft_probs, drafts, torch.ones(3, dtype=torch.bool),
                                     torch.arange(3), torch.zeros(3, dtype=torch.int64))  # fmt: skip
    assert accepted.tolist() == [2, 1, 0]
    assert out.tolist() == [[2, 4, 1], [2, 4, -1], [2, -1, -1]]
