"""The public API (glm5c/llm.py, glm5c/sampling.py): LLM.generate on the tiny checkpoint, stop
conditions, seeded sampling, batching, and input validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from glm5c import LLM, RequestOutput, SamplingParams

GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
PROMPT_IDS = [300, 301, 302, 303, 304]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny model's matmuls gain nothing from two, and on a busy 2-core
    machine OpenMP barriers make each step ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm(tiny_dir) -> LLM:
    return LLM(tiny_dir)


@pytest.fixture(scope="module")
def greedy_ids(llm) -> list[int]:
    """The greedy continuation of PROMPT_IDS (8 tokens)."""
    (out,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=8, temperature=0.0))
    return out.token_ids


def _copy_checkpoint(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    return Path(shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip]))


# ---- generate ------------------------------------------------------------------------------------


def test_string_prompt(llm):
    """A text prompt is tokenized without special tokens; the result carries ids, text and reason."""
    (out,) = llm.generate("Hello world", GREEDY)
    assert isinstance(out, RequestOutput)
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello world", add_special_tokens=False)
    assert len(out.token_ids) == 5 and all(isinstance(t, int) for t in out.token_ids)
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.finish_reason == "length"


def test_token_id_prompt(llm, greedy_ids):
    """A list of ids is one prompt; greedy decoding repeats exactly."""
    (out,) = llm.generate(PROMPT_IDS, GREEDY)
    assert out.prompt_token_ids == PROMPT_IDS
    assert out.token_ids == greedy_ids[:5]
    assert isinstance(out.text, str)


def test_mixed_prompt_list(llm, greedy_ids):
    """A list mixing text and id prompts gives one output per prompt, in order."""
    text_ids = llm.tokenizer.encode("Hello world", add_special_tokens=False)
    outs = llm.generate(["Hello world", PROMPT_IDS], GREEDY)
    assert [o.prompt_token_ids for o in outs] == [text_ids, PROMPT_IDS]
    assert outs[1].token_ids == greedy_ids[:5]
    (alone,) = llm.generate([text_ids], GREEDY)
    assert outs[0].token_ids == alone.token_ids


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_max_tokens(llm, greedy_ids, max_tokens):
    (out,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    assert out.token_ids == greedy_ids[:max_tokens]
    assert out.finish_reason == "length"


def test_stop_token_ids(llm, greedy_ids):
    """Generation stops at (and keeps) the first stop token."""
    stop = greedy_ids[2]
    k = greedy_ids.index(stop)
    (out,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop]))
    assert out.token_ids == greedy_ids[: k + 1]
    assert out.finish_reason == "stop"


def test_stop_token_in_other_request_only(llm, greedy_ids):
    """Stop tokens are per request: the other request in the batch runs to max_tokens."""
    stop = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[greedy_ids[0]])
    plain = SamplingParams(max_tokens=8, temperature=0.0)
    outs = llm.generate([PROMPT_IDS, PROMPT_IDS], [stop, plain])
    assert outs[0].token_ids == greedy_ids[:1] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == greedy_ids and outs[1].finish_reason == "length"


def test_eos_stops_unless_ignored(llm, greedy_ids, tiny_dir, tmp_path):
    """A model whose eos id is the greedy next token stops at once; ignore_eos=True continues."""
    ckpt = _copy_checkpoint(tiny_dir, tmp_path / "eos")
    config = json.loads((ckpt / "config.json").read_text())
    config["eos_token_id"] = [llm.config.eos_token_ids[0], greedy_ids[0]]
    (ckpt / "config.json").write_text(json.dumps(config))
    eos_llm = LLM(ckpt)
    (out,) = eos_llm.generate([PROMPT_IDS], SamplingParams(max_tokens=6, temperature=0.0))
    assert out.token_ids == greedy_ids[:1] and out.finish_reason == "stop"
    (out,) = eos_llm.generate([PROMPT_IDS], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert out.token_ids == greedy_ids[:6] and out.finish_reason == "length"


def test_model_without_tokenizer(tiny_dir, tmp_path, greedy_ids):
    """Without tokenizer files, id prompts work (text is None) and a text prompt is a clear error."""
    bare = LLM(_copy_checkpoint(tiny_dir, tmp_path / "bare", skip=TOKENIZER_FILES))
    assert bare.tokenizer is None
    (out,) = bare.generate([PROMPT_IDS], GREEDY)
    assert out.token_ids == greedy_ids[:5]
    assert out.text is None
    with pytest.raises(ValueError, match="prompt 1 is text but .* has no tokenizer"):
        bare.generate([PROMPT_IDS, "hello"], GREEDY)


def test_seeded_sampling(llm):
    """A seed makes sampling reproducible; another seed gives another sample."""
    def run(seed):
        params = SamplingParams(max_tokens=8, temperature=0.8, seed=seed)
        return llm.generate([PROMPT_IDS], params)[0].token_ids

    first = run(3)
    assert run(3) == first
    assert run(4) != first


def test_sampling_filters_reduce_to_greedy(llm, greedy_ids):
    """top_k=1 (and a tiny top_p) keep only the most likely token: sampling then equals greedy."""
    for params in (SamplingParams(max_tokens=5, top_k=1, seed=1), SamplingParams(max_tokens=5, top_p=1e-6, seed=1)):
        assert llm.generate([PROMPT_IDS], params)[0].token_ids == greedy_ids[:5]


def test_batched_equals_alone(llm):
    """Greedy output of each prompt in a batch equals that prompt run alone."""
    prompts = [PROMPT_IDS, [7, 1000, 3], list(range(40, 70)), [1]]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        assert out.token_ids == llm.generate([prompt], params)[0].token_ids


def test_chunked_prefill_equals_whole(llm):
    """A per-step token budget smaller than the prompts (chunked prefill) changes nothing."""
    prompts = [list(range(100, 140)), PROMPT_IDS]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    whole = llm.generate(prompts, params)
    scheduler, blocks = llm.engine.scheduler, llm.engine.blocks
    budget = scheduler.max_tokens_per_step
    scheduler.max_tokens_per_step, blocks.prefix_caching = 7, False  # (the cache would skip the prefill)
    try:
        chunked = llm.generate(prompts, params)
        assert llm.last_stats["steps"] > 4 + 40 // 7
    finally:
        scheduler.max_tokens_per_step, blocks.prefix_caching = budget, True
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]


# ---- SamplingParams validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", True),
        ("max_tokens", 2.0),
        ("temperature", -1),
        ("temperature", float("nan")),
        ("temperature", True),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", True),
        ("min_p", 2),
        ("seed", "x"),
        ("seed", True),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [True]),
    ],
)
def test_bad_sampling_params(field, value):
    with pytest.raises(ValueError, match=f"^SamplingParams.{field}="):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop_token_ids=[5, 6], top_k=-1, temperature=0)
    assert p.stop_token_ids == (5, 6) and p.greedy
    assert not SamplingParams().greedy


# ---- prompt validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[]], "prompt 0 is empty"),
        ("", "prompt 0 is empty"),
        ([], "non-empty list"),
        ([1408], r"prompt 0 has token ids outside \[0, 1408\): \[1408\]"),
        ([5, -1], r"prompt 0 has token ids outside \[0, 1408\): \[-1\]"),
        ([[5], [True, 5]], r"prompt 1 has token ids outside \[0, 1408\): \[True\]"),
        (5, "prompts must be a string, a list of token ids"),
        ([[5], 7.5], "prompt 1 must be a string or a list of token ids, got float"),
        ([[5], None], "prompt 1 must be a string or a list of token ids, got NoneType"),
    ],
)
def test_bad_prompts(llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, GREEDY)


def test_prompt_longer_than_context(llm):
    n = llm.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt 0: {n} tokens \\+ max_tokens 1 exceed the context of {n}"):
        llm.generate([[1] * n], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=f"prompt 1: 10 tokens \\+ max_tokens {n - 5} exceed"):
        llm.generate([[1], [1] * 10], SamplingParams(max_tokens=n - 5))


def test_sampling_params_count_must_match(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([PROMPT_IDS], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="0 SamplingParams for 1 prompts"):
        llm.generate([PROMPT_IDS], [])


def test_bad_constructor_arguments(tiny_dir):
    with pytest.raises(ValueError, match="dtype 'fp4' is not one of"):
        LLM(tiny_dir, dtype="fp4")
    with pytest.raises(ValueError, match=r"EngineConfig.block_size must be >= 1, got 0"):
        LLM(tiny_dir, block_size=0)
    with pytest.raises(ValueError, match=r"EngineConfig.max_tokens_per_step must be >= 1, got -3"):
        LLM(tiny_dir, max_tokens_per_step=-3)


def test_penalties_break_a_greedy_loop(llm, greedy_ids):
    """The tiny model's greedy continuation repeats a token; each penalty (batched sampler, counts of
    the request's own tokens) stops the repetition."""
    assert len(set(greedy_ids)) < len(greedy_ids)
    for penalty in (dict(repetition_penalty=1.3), dict(presence_penalty=2.0), dict(frequency_penalty=2.0)):
        (out,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=8, temperature=0.0, **penalty))
        assert len(set(out.token_ids)) == len(out.token_ids), penalty


def test_logprobs_are_returned_per_token(llm):
    """SamplingParams(logprobs=n) gives, per generated token, its logprob and the top-n; greedy
    tokens are their own top-1; without logprobs there are none."""
    import math

    (out,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3))
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 5
    for token, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3 and max(top, key=top.get) == token and math.isclose(top[token], lp)
        assert lp <= 0.0 and sorted(top.values(), reverse=True) == list(top.values())
    (plain,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=2, temperature=0.0))
    assert plain.logprobs is None


def test_stop_strings_cut_the_text(llm):
    """A stop string taken from the greedy text ends the request there: finish "stop", text cut
    before it, and the request frees its blocks."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    (full,) = llm.generate([PROMPT_IDS], params)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), full.text
    (out,) = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.find(stop)]
    assert len(out.token_ids) < len(full.token_ids)
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="SamplingParams.stop"):
        SamplingParams(stop="abc")
