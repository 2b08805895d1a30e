"""In-process generation: `LLM(model_dir).generate(prompts, SamplingParams(...))`.

The loop here batches every request into each step: prompts are prefilled in chunks under a
per-step token budget, mixed with one decode token per running request, through the paged
cache. (The runtime's scheduler, block manager and on-device sampler replace this loop.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .batch import SeqChunk, build_step_batch
from .default_model import default_model_dir
from .kv_cache import KVCache
from .ops import REFERENCE, Ops
from .sampling import SamplingParams, sample
from .tokenizer import load_tokenizer
from .weights import build_model

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # the generated ids
    text: str | None  # the generated text, when the model directory has a tokenizer
    finish_reason: str  # "stop" (eos or a stop token) | "length" (max_tokens)


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    blocks: list[int]
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose cache entries are written
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        block_size: int = 16,
        max_tokens_per_step: int = 256,
        ops: Ops = REFERENCE,
        keep_fp8: bool = True,
        artifacts: str | Path | None = None,
    ) -> None:
        """`artifacts`: a directory from `glm5c compile`; steps then run its compiled graphs
        (and nothing is compiled here: stale or mismatched artifacts are refused)."""
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        if block_size < 1 or max_tokens_per_step < 1:
            raise ValueError("block_size and max_tokens_per_step must be >= 1")
        self.model_dir = Path(model) if model is not None else default_model_dir()
        self.device = torch.device(device)
        self.runner = None
        self.max_model_len = None
        if artifacts is not None:
            from glm5c.graphs.compile import compiled_ops
            from glm5c.graphs.manifest import Manifest

            ops = compiled_ops(Manifest.read(artifacts))
            keep_fp8 = keep_fp8 and self.device.type != "cuda"  # the GPU graphs take dequantized experts for now
        self.model = build_model(self.model_dir, dtype=dtype, device=self.device, ops=ops, keep_fp8=keep_fp8)
        self.config = self.model.config
        self.tokenizer = load_tokenizer(self.model_dir)
        self.block_size = block_size
        self.max_tokens_per_step = max_tokens_per_step
        if artifacts is not None:
            from glm5c.graphs.runner import GraphRunner

            self.runner = GraphRunner(artifacts, self.model, self.model_dir)
            self.block_size = self.runner.block_size
            self.max_tokens_per_step = min(max_tokens_per_step, self.runner.buckets.largest)
            self.max_model_len = self.runner.manifest.max_model_len
        self.last_stats: dict[str, float] = {}

    # ---- the public API --------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        prompt_ids = [self._prompt_ids(p, i) for i, p in enumerate(_as_prompt_list(prompts))]
        params = SamplingParams() if sampling_params is None else sampling_params  # [] is an error below
        params_list = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompt_ids):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompt_ids)} prompts")
        context = self.max_model_len or self.config.max_position_embeddings
        for i, (ids, p) in enumerate(zip(prompt_ids, params_list)):
            if len(ids) + p.max_tokens > context:
                raise ValueError(
                    f"prompt {i}: {len(ids)} tokens + max_tokens {p.max_tokens} exceed the context of {context}"
                )
        return self._run(prompt_ids, params_list)

    # ---- internals ---------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int], index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but {self.model_dir} has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {index} has token ids outside [0, {self.config.vocab_size}): {bad[:5]}")
        else:
            raise ValueError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        return ids

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        bs = self.block_size
        need = [-(-(len(p) + sp.max_tokens) // bs) for p, sp in zip(prompts, params)]
        cache = KVCache(self.config, sum(need), bs, self.model.dtype, self.device)
        free = list(range(cache.num_blocks))  # handed out from the end: tables are not contiguous
        reqs = []
        for p, sp, n in zip(prompts, params, need):
            blocks = [free.pop() for _ in range(n)]
            gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
            reqs.append(_Request(p, sp, blocks, gen))
        eos = set(self.config.eos_token_ids)

        start, steps, tokens_run = time.perf_counter(), 0, 0
        while running := [r for r in reqs if r.finish_reason is None]:
            budget = self.max_tokens_per_step
            chunks, owners = [], []
            for r in running:  # decodes first (one token each), then prefill chunks
                todo = len(r.tokens) - r.num_computed
                if todo == 1 and budget > 0:
                    chunks.append(SeqChunk(r.tokens[-1:], r.num_computed, r.blocks))
                    owners.append(r)
                    budget -= 1
            for r in running:
                todo = len(r.tokens) - r.num_computed
                if todo > 1 and budget > 0:
                    n = min(todo, budget)
                    chunks.append(SeqChunk(r.tokens[r.num_computed : r.num_computed + n], r.num_computed, r.blocks,
                                           want_logits=n == todo))  # fmt: skip
                    owners.append(r)
                    budget -= n
            max_blocks = self.runner.max_blocks if self.runner else None
            batch = build_step_batch(chunks, bs, cache.pad_slot, self.device, max_blocks=max_blocks)
            with torch.inference_mode():
                hidden = self.runner(batch, cache) if self.runner else self.model(batch, cache)
                logits = self.model.logits(hidden[batch.logits_indices])  # [N, vocab]
            steps += 1
            tokens_run += batch.num_tokens
            row = 0
            for chunk, r in zip(chunks, owners):
                r.num_computed += len(chunk.token_ids)
                if not chunk.want_logits:
                    continue
                token = sample(logits[row], r.params, r.generator)
                row += 1
                r.output.append(token)
                if (token in eos and not r.params.ignore_eos) or token in r.params.stop_token_ids:
                    r.finish_reason = "stop"
                elif len(r.output) >= r.params.max_tokens:
                    r.finish_reason = "length"
        elapsed = time.perf_counter() - start
        generated = sum(len(r.output) for r in reqs)
        self.last_stats = {"steps": steps, "tokens_run": tokens_run, "generated": generated, "elapsed_s": elapsed}
        return [
            RequestOutput(r.prompt, r.output, self._decode(r.output), r.finish_reason or "length") for r in reqs
        ]

    def _decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)


def _as_prompt_list(prompts: object) -> list:
    """A single prompt (str or list of ids) or a list of prompts -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if isinstance(prompts, Sequence) and prompts:
        return list(prompts)
    raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
