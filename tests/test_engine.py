"""The runtime: block manager (prefix cache, reference counts, eviction), scheduler (chunked
prefill under a token budget, preemption, bounded queue) and the step-level engine."""

from __future__ import annotations

import pytest
import torch

from glm5c.block_manager import BlockManager
from glm5c.engine import Engine, EngineConfig
from glm5c.sampling import SamplingParams
from glm5c.scheduler import QueueFullError, Scheduler, Sequence

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(22, 1300, (n,), generator=g).tolist() for n in lengths]


def _run(engine: Engine, prompts, params=GREEDY) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return out


# ---- block manager -----------------------------------------------------------------------------


def test_blocks_are_reference_counted_and_reused_by_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(100, 110))  # 10 tokens: blocks [0-3], [4-7], [8-9]
    assert bm.allocate_prompt("a", prompt) == 0
    bm.cache_full_blocks("a", prompt, num_computed=10)  # two full blocks hashed
    assert bm.allocate_prompt("b", prompt + [7, 8]) == 8  # shares both full blocks
    assert bm.tables["b"][:2] == bm.tables["a"][:2] and bm.ref_counts[bm.tables["a"][0]] == 2
    assert bm.stats.hit_blocks == 2
    bm.free_sequence("a")
    assert bm.ref_counts[bm.tables["b"][0]] == 1
    bm.free_sequence("b")
    assert bm.num_free_blocks == 8
    # freed blocks keep their contents: a third request still hits them
    assert bm.allocate_prompt("c", prompt) == 8


def test_the_block_of_the_last_prompt_token_is_never_shared():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    bm.allocate_prompt("a", prompt)
    bm.cache_full_blocks("a", prompt, 8)
    assert bm.allocate_prompt("b", prompt) == 4  # the second block holds the last token: recomputed


def test_short_pool_allocates_nothing_and_eviction_reuses_cached_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.allocate_prompt("a", list(range(12))) == 0
    assert bm.allocate_prompt("b", [1]) is None and "b" not in bm.tables
    bm.cache_full_blocks("a", list(range(12)), 12)
    bm.free_sequence("a")
    assert bm.allocate_prompt("b", list(range(50, 62))) == 0  # evicts the cached blocks
    assert not bm.cached  # their hashes are gone with them
    assert not bm.grow("b", 13)


# ---- scheduler ---------------------------------------------------------------------------------


def _seq(i, n, max_tokens=4):
    return Sequence(f"s{i}", n, list(range(30, 30 + n)), SamplingParams(max_tokens=max_tokens), i)


def test_chunked_prefill_under_the_token_budget_with_decodes_first():
    sched = Scheduler(BlockManager(64, 4), max_tokens_per_step=8, max_seqs=8, max_waiting=8)
    sched.add(_seq(0, 3))
    sched.add(_seq(1, 13))
    chunks = sched.schedule()
    assert [(c.seq.id, c.start, c.num_tokens) for c in chunks] == [("s0", 0, 3), ("s1", 0, 5)]
    for c in chunks:
        c.seq.num_computed += c.num_tokens
    chunks[0].seq.tokens.append(5)  # s0 sampled a token: it now decodes
    chunks = sched.schedule()
    assert [(c.seq.id, c.start, c.num_tokens, c.needs_logits) for c in chunks] == [
        ("s0", 3, 1, True), ("s1", 5, 7, False)]  # fmt: skip


def test_preemption_frees_the_newest_sequence_and_requeues_it_first():
    sched = Scheduler(BlockManager(4, 4), max_tokens_per_step=64, max_seqs=8, max_waiting=8)
    a, b = _seq(0, 8), _seq(1, 8)
    sched.add(a)
    sched.add(b)
    for c in sched.schedule():  # both prompts fill all 4 blocks
        c.seq.num_computed += c.num_tokens
        c.seq.tokens.append(1)
    chunks = sched.schedule()  # a needs a fifth block: b is preempted
    assert [c.seq.id for c in chunks] == ["s0"]
    assert sched.waiting[0] is b and b.num_computed == 0 and sched.stats.preemptions == 1


def test_bounded_queue_and_impossible_requests():
    sched = Scheduler(BlockManager(4, 4), max_tokens_per_step=8, max_seqs=8, max_waiting=2)
    sched.add(_seq(0, 2))
    sched.add(_seq(1, 2))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        sched.add(_seq(2, 2))
    with pytest.raises(ValueError, match="needs 5 KV blocks .* more than the whole cache"):
        Scheduler(BlockManager(4, 4), 8, 8, 8).add(_seq(3, 17, max_tokens=1))


# ---- engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_factory(tiny_dir):
    def make(**config):
        return Engine(tiny_dir, dtype="float32", config=EngineConfig(**{"block_size": 4, **config}))

    return make


def test_batch_invariance(engine_factory):
    """16 mixed-length requests run together give each the tokens it gets alone."""
    prompts = _prompts([1, 2, 3, 5, 8, 13, 21, 34, 7, 9, 40, 17, 4, 26, 11, 30], seed=1)
    together = _run(engine_factory(max_tokens_per_step=64), prompts)
    for i, p in enumerate(prompts):
        alone = _run(engine_factory(), [p])
        assert together[f"r{i}"] == alone["r0"], f"request {i} (prompt of {len(p)}) differs"


def test_prefix_cache_reuses_blocks_and_keeps_outputs(engine_factory):
    shared = _prompts([48], seed=2)[0]
    prompts = [shared + [101, 102], shared + [201, 202, 203]]
    cached = engine_factory()
    first = _run(cached, prompts[:1])
    hits_before = cached.blocks.stats.hit_blocks
    second = _run(cached, prompts[1:])
    assert cached.blocks.stats.hit_blocks - hits_before == 12  # all 48 shared tokens' blocks
    uncached = _run(engine_factory(prefix_caching=False), prompts)
    assert first["r0"] == uncached["r0"] and second["r0"] == uncached["r1"]


def test_preemption_under_a_tiny_pool_gives_the_roomy_outputs(engine_factory):
    prompts = _prompts([9, 14, 6, 20, 3, 11], seed=3)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    roomy = _run(engine_factory(), prompts, params)
    tight = engine_factory(num_blocks=12)  # 48 slots for 6 requests needing 15-32 each
    assert _run(tight, prompts, params) == roomy
    assert tight.scheduler.stats.preemptions > 0


def test_abort_frees_blocks_and_bad_requests_are_refused(engine_factory):
    engine = engine_factory(num_blocks=32)
    engine.add_request("x", list(range(30, 60)), GREEDY)
    engine.step()
    assert engine.blocks.num_free_blocks < 32
    assert engine.abort("x") and not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == 32 and not engine.abort("x")
    for prompt, match in [([], "empty"), ([10**6], "outside"), ([1] * 5000, "exceed the context")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request("y", prompt, GREEDY)
    engine.add_request("z", [5], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("z", [5], GREEDY)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_greedy_output_equals_plain_greedy(engine_factory, k):
    """With MTP drafting, greedy outputs are token for token those without it (the main model
    verifies every draft), over many prompts and chunked prefills."""
    prompts = _prompts([1, 2, 5, 9, 16, 17, 23, 31, 40, 3, 12, 27], seed=4)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = _run(engine_factory(max_tokens_per_step=32), prompts, params)
    spec = engine_factory(max_tokens_per_step=32, num_speculative_tokens=k)
    assert _run(spec, prompts, params) == plain
    stats = spec.drafter.stats
    assert stats.drafted > 0 and stats.verify_steps > 0 and 1.0 <= stats.mean_accept_length <= k + 1


def test_accepted_drafts_give_the_same_output_in_fewer_steps(engine_factory, monkeypatch):
    """Drafts that are right (here: the plain run's own next tokens, standing in for a trained MTP
    layer) are all accepted: same tokens, k + 1 per verify step, fewer steps."""
    from glm5c.mtp import Drafter

    prompts = _prompts([5, 18, 9], seed=6)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain_engine = engine_factory()
    plain = _run(plain_engine, prompts, params)
    plain_steps = len(plain_engine.step_times_s)
    full = {f"r{i}": p + plain[f"r{i}"] for i, p in enumerate(prompts)}
    real_draft = Drafter.catch_up_and_draft

    def oracle(self, entries):
        real_draft(self, entries)  # keeps the MTP cache written; then replace the drafts with the truth
        for e in entries:
            if e.seq.draft:
                n = len(e.seq.tokens)
                e.seq.draft = full[e.seq.id][n : n + self.k] + [0] * (self.k - len(full[e.seq.id][n : n + self.k]))

    monkeypatch.setattr(Drafter, "catch_up_and_draft", oracle)
    spec = engine_factory(num_speculative_tokens=3)
    assert _run(spec, prompts, params) == plain
    stats = spec.drafter.stats
    assert stats.accepted > 0.8 * stats.drafted and stats.mean_accept_length > 3.5
    assert len(spec.step_times_s) < plain_steps / 2


def test_mtp_with_sampled_requests(engine_factory):
    """Sampled requests draft too and are verified by rejection sampling: lengths are right, seeded
    runs repeat exactly, and requests with penalties simply decode without drafts."""
    prompts = _prompts([4, 11, 19], seed=7)
    params = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    first = engine_factory(num_speculative_tokens=2)
    out = _run(first, prompts, params)
    assert all(len(v) == 14 for v in out.values()) and first.drafter.stats.drafted > 0
    assert _run(engine_factory(num_speculative_tokens=2), prompts, params) == out
    penalized = engine_factory(num_speculative_tokens=2)
    _run(penalized, prompts[:1], SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.2))
    assert penalized.drafter.stats.drafted == 0


def test_fp8_index_cache(engine_factory):
    """Indexer keys kept as FP8 + per-token scales: while the context fits in index_topk the
    indexer's choice is moot and outputs are identical; past it, FP8 scores may reorder near-ties."""
    short = _prompts([3, 7, 10], seed=8)  # 10 + 5 new tokens stay within index_topk = 16
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    fp8 = engine_factory(fp8_index_cache=True)
    assert fp8.cache.index_k[0].dtype == torch.float8_e4m3fn and fp8.cache.index_scale[0] is not None
    assert _run(fp8, short, params) == _run(engine_factory(), short, params)
    long = _prompts([40, 55], seed=9)
    out = _run(engine_factory(fp8_index_cache=True), long, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert all(len(v) == 8 for v in out.values())


def test_triton_kernels_run_the_model(tiny_dir):
    """The whole Triton op set (FP8-capable GEMMs, grouped-GEMM experts, DSA; under the
    interpreter on a CPU) gives the reference's greedy tokens, past index_topk."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    from glm5c import LLM
    from glm5c.ops import triton_ops

    prompts = _prompts([20, 33], seed=10)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    want = LLM(tiny_dir, dtype="float32").generate(prompts, params)
    got = LLM(tiny_dir, dtype="float32", ops=triton_ops()).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_engine_config_is_validated(tiny_dir):
    for field, value in [("block_size", 0), ("max_tokens_per_step", 0), ("max_seqs", -1), ("max_waiting", 0),
                         ("num_blocks", 0), ("num_speculative_tokens", 17)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
            EngineConfig(**{field: value})
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        Engine(tiny_dir, dtype="int8")
