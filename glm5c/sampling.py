"""Sampling: parameters (validated once, where a request enters), the per-step SamplingBatch,
and `sample`, one call per step for the whole batch.

`sample` runs on the logits' device with no host syncs (no .item(), no Python branching on
tensor values), so it can run inside a captured CUDA graph: the only Python branches are on the
SamplingBatch's static fields (penalties present, top-k/top-p needed, how many top logprobs),
which the engine keys its graphs by.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .noise import SAMPLE, gumbel

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings, cut from the text (needs a tokenizer)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output; 1 = off
    presence_penalty: float = 0.0  # subtracted from the logit of every token in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    logprobs: int | None = None  # report the n most likely tokens' logprobs too (0..20)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be a number in [0, 100]")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 1, or 0 / -1 for off")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be a number in [-2, 2]")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @functools.cached_property
    def argmax_only(self) -> bool:
        """Greedy with no penalties and no logprobs: the next token is the logits' argmax, nothing
        else to compute. (Cached: the engine asks for every request at every step.)"""
        return self.greedy and not self.penalized and self.logprobs is None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


# Seeds for requests that bring none: drawn here, so seeded requests never depend on them.
_UNSEEDED = torch.Generator()
_UNSEEDED.seed()


@dataclass(frozen=True)
class SamplingBatch:
    """One step's sampling parameters, one row per request that samples, as device tensors."""

    greedy: Tensor  # [N] bool: temperature 0
    temperature: Tensor  # [N] fp32, 1 for greedy rows (their logprobs are of the penalized logits)
    top_k: Tensor  # [N] int64 in [1, V] (V when off)
    top_p: Tensor  # [N] fp32 in (0, 1]
    min_p: Tensor  # [N] fp32 in [0, 1]
    seeds: Tensor  # [N] int64: the request's seed mod 2**64, or one drawn for this step
    positions: Tensor  # [N] int64: the index in its sequence of the token being sampled
    repetition_penalty: Tensor  # [N] fp32
    presence_penalty: Tensor  # [N] fp32
    frequency_penalty: Tensor  # [N] fp32
    output_counts: Tensor | None  # [N, V] fp32 occurrences in the output; None when no row has penalties
    seen: Tensor | None  # [N, V] bool: in the prompt or the output; None when no row has penalties
    use_top_k_top_p: bool  # static: some sampled row has top_k < V or top_p < 1
    all_greedy: bool  # static: no row samples, so no noise is drawn
    want_logprobs: bool  # static: some row asked for logprobs (else none are computed)
    num_top_logprobs: int  # static: the largest `logprobs` asked for (0 = none)

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams],
        output_tokens: list[list[int]],
        prompt_tokens: list[list[int]],
        positions: list[int],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Row i samples the token at `positions[i]` of a request with `params[i]`, whose prompt
        and generated tokens so far are `prompt_tokens[i]` and `output_tokens[i]`."""
        n = len(params)
        if not len(output_tokens) == len(prompt_tokens) == len(positions) == n:
            raise ValueError(f"{n} params, {len(output_tokens)} outputs, {len(prompt_tokens)} prompts and "
                             f"{len(positions)} positions: one of each per row")  # fmt: skip
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        all_greedy = all(p.greedy for p in params)
        # an all-greedy step draws no noise: its unseeded rows need no fresh seeds
        unseeded = torch.zeros(0 if all_greedy else sum(p.seed is None for p in params), dtype=torch.int64)
        drawn = iter(unseeded.random_(generator=_UNSEEDED).tolist())
        seeds = [_int64(p.seed) if p.seed is not None else next(drawn, 0) for p in params]
        # one tensor per dtype, its columns the fields (a torch.tensor call per field cost ~10 us each)
        floats = torch.tensor([[1.0 if p.greedy else p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                                p.presence_penalty, p.frequency_penalty] for p in params],
                              dtype=torch.float32, device=device).view(n, 6).unbind(1)  # fmt: skip
        ints = torch.tensor([[p.top_k if 0 < p.top_k < vocab_size else vocab_size, seed, pos]
                             for p, seed, pos in zip(params, seeds, positions)],
                            dtype=torch.int64, device=device).view(n, 3).unbind(1)  # fmt: skip
        counts = seen = None
        if any(p.penalized for p in params):
            counts = _token_counts(output_tokens, vocab_size, device)  # [N, V]
            seen = (_token_counts(prompt_tokens, vocab_size, device) > 0) | (counts > 0)
        return cls(
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            temperature=floats[0],
            top_k=ints[0],
            top_p=floats[1],
            min_p=floats[2],
            seeds=ints[1],
            positions=ints[2],
            repetition_penalty=floats[3],
            presence_penalty=floats[4],
            frequency_penalty=floats[5],
            output_counts=counts,
            seen=seen,
            use_top_k_top_p=any(not p.greedy and (0 < p.top_k < vocab_size or p.top_p < 1.0) for p in params),
            all_greedy=all_greedy,
            want_logprobs=any(p.logprobs is not None for p in params),
            num_top_logprobs=min(max((p.logprobs or 0 for p in params), default=0), vocab_size),
        )


def argmax_tokens(logits: Tensor) -> list[int]:
    """Each row's argmax as ints (the first on ties, NaN counting as the largest, as torch.argmax).
    On a CPU by numpy (which transformers requires): torch's argmax cost ~15 us for 16 x 1408
    logits, numpy's 2 (2-core dev machine; ~34 vs ~26 us in a step, caches cold after the graph)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def _int64(seed: int) -> int:
    """Any Python int -> the int64 with the same low 64 bits."""
    seed &= 2**64 - 1
    return seed - 2**64 if seed >= 2**63 else seed


def _token_counts(tokens: list[list[int]], vocab_size: int, device: torch.device | str) -> Tensor:
    """Per-row token lists -> [N, V] fp32 occurrence counts, by scatter_add on the device."""
    width = max((len(t) for t in tokens), default=0)
    padded = [t + [vocab_size] * (width - len(t)) for t in tokens]  # vocab_size: a spare column
    ids = torch.tensor(padded, dtype=torch.int64, device=device).view(len(tokens), width)  # [N, L]
    counts = torch.zeros(len(tokens), vocab_size + 1, dtype=torch.float32, device=device)
    return counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))[:, :vocab_size]


@dataclass(frozen=True)
class SampleResult:
    token_ids: Tensor  # [N] int64
    logprobs: Tensor | None  # [N] fp32: the chosen token's logprob; None when no row asked for logprobs
    top_logprobs: Tensor | None  # [N, n] fp32, descending, n = batch.num_top_logprobs; None when n = 0
    top_ids: Tensor | None  # [N, n] int64


def sample(logits: Tensor, batch: SamplingBatch) -> SampleResult:
    """logits [N, V] fp32 -> one token per row.

    Greedy rows take the argmax of the penalized logits. Other rows apply penalties, temperature,
    top-k, top-p (on the top-k-renormalized distribution), then min-p, and draw by the Gumbel-max
    trick with noise from (seed, position, vocab index): a request's token depends only on its
    logits, parameters, seed and position, never on the rest of the batch.

    Logprobs (chosen and top-n) are of log_softmax(penalized logits / temperature), before the
    top-k/top-p/min-p masks (greedy rows: temperature 1), computed only when some row asked for
    them. Rows that asked for fewer than n top logprobs get n; the caller keeps what each asked for."""
    scaled = _scaled(logits, batch)  # [N, V]
    if batch.all_greedy:
        token_ids = scaled.argmax(-1)  # [N]
    else:
        drawn = (_masked(scaled, batch) + gumbel(batch.seeds, batch.positions, logits.shape[-1], SAMPLE)).argmax(-1)
        token_ids = torch.where(batch.greedy, scaled.argmax(-1), drawn)  # [N]
    if not batch.want_logprobs:  # a log-softmax over the vocabulary nobody reads
        return SampleResult(token_ids, None, None, None)
    logprobs = scaled.log_softmax(-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [N]
    if batch.num_top_logprobs == 0:
        return SampleResult(token_ids, chosen, None, None)
    top = logprobs.topk(batch.num_top_logprobs, dim=-1)
    return SampleResult(token_ids, chosen, top.values, top.indices)


def sampling_probs(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """logits [N, V] fp32 -> [N, V] fp32: the distribution `sample` draws each row from (one-hot
    at the argmax for greedy rows). The target and draft distributions of `rejection_sample`."""
    scaled = _scaled(logits, batch)
    one_hot = torch.zeros_like(scaled).scatter_(1, scaled.argmax(-1, keepdim=True), 1.0)
    return torch.where(batch.greedy.unsqueeze(1), one_hot, _masked(scaled, batch).softmax(-1))


def _scaled(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[N, V] -> [N, V]: penalties (vLLM/OpenAI semantics), then temperature."""
    if batch.output_counts is not None:
        rp = batch.repetition_penalty.unsqueeze(1)
        logits = torch.where(batch.seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        logits = (logits - batch.frequency_penalty.unsqueeze(1) * batch.output_counts
                  - batch.presence_penalty.unsqueeze(1) * (batch.output_counts > 0))  # fmt: skip
    return logits / batch.temperature.unsqueeze(1)


def _masked(scaled: Tensor, batch: SamplingBatch) -> Tensor:
    """[N, V] -> [N, V] with -inf outside each row's top-k, top-p and min-p sets (each keeps the argmax)."""
    if batch.use_top_k_top_p:
        ordered, order = scaled.sort(dim=-1, descending=True, stable=True)  # [N, V]
        rank = torch.arange(scaled.shape[-1], device=scaled.device)
        drop = rank >= batch.top_k.unsqueeze(1)  # [N, V] in sorted order
        probs = ordered.masked_fill(drop, -math.inf).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        top_p = batch.top_p.unsqueeze(1)
        drop |= (before >= top_p) & (top_p < 1.0)  # top_p = 1 drops nothing, whatever cumsum rounding does
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
    # min-p: p < min_p * p_max  <=>  logit < max logit + log(min_p)  (log 0 = -inf drops nothing)
    floor = scaled.amax(-1, keepdim=True) + batch.min_p.log().unsqueeze(1)
    return scaled.masked_fill(scaled < floor, -math.inf)
