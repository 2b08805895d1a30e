"""In-process generation: `LLM(model_dir).generate(prompts, SamplingParams(...))`, a thin layer
over the step-level `Engine`: every prompt becomes a request, and steps run until all finish."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .default_model import default_model_dir
from .detokenizer import IncrementalDetokenizer
from .engine import Engine, EngineConfig
from .ops import REFERENCE, Ops
from .sampling import SamplingParams
from .tokenizer import load_tokenizer


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # the generated ids
    text: str | None  # the generated text, when the model directory has a tokenizer
    finish_reason: str  # "stop" (eos or a stop token) | "length" (max_tokens)
    # with SamplingParams(logprobs=n): per generated token, (its logprob, the top-n {id: logprob})
    logprobs: list[tuple[float, dict[int, float]]] | None = None


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
        engine_config: EngineConfig | None = None,
    ) -> None:
        """`artifacts`: a directory from `glm5c compile`; steps then run its compiled graphs
        (and nothing is compiled here: stale or mismatched artifacts are refused).
        `engine_config` overrides block_size / max_tokens_per_step and sets the rest (KV blocks,
        prefix caching, MTP drafts)."""
        config = engine_config or EngineConfig(block_size=block_size, max_tokens_per_step=max_tokens_per_step)
        self.model_dir = Path(model) if model is not None else default_model_dir()
        self.engine = Engine(self.model_dir, dtype, device, config, artifacts, ops, keep_fp8)
        self.model = self.engine.model
        self.config = self.model.config
        self.runner = self.engine.runner
        self.tokenizer = load_tokenizer(self.model_dir)
        self.last_stats: dict[str, float] = {}
        self._ids = itertools.count()

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
        if self.tokenizer is None and any(p.stop for p in params_list):
            raise ValueError(f"stop strings need a tokenizer, and {self.model_dir} has none (use stop_token_ids)")
        context = self.engine.max_model_len
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
        engine = self.engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                engine.add_request(request_id, prompt, p)
        except Exception:
            for request_id in ids:
                engine.abort(request_id)
            raise
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        logprobs: dict[str, list] = {}
        reasons: dict[str, str] = {}
        # stop strings live in text: each such request's tokens go through a detokenizer
        detoks = {i: IncrementalDetokenizer(self.tokenizer, p.stop) for i, p in zip(ids, params) if p.stop}
        start, steps_before = time.perf_counter(), len(engine.step_times_s)
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] += out.new_token_ids
                if out.logprobs is not None:
                    logprobs.setdefault(out.request_id, []).extend(out.logprobs)
                detok = detoks.get(out.request_id)
                if detok is not None and not out.finished:
                    detok.push(out.new_token_ids)
                    if detok.stopped_by is not None:
                        engine.abort(out.request_id)
                        reasons[out.request_id] = "stop"
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        elapsed = time.perf_counter() - start
        self.last_stats = {"steps": len(engine.step_times_s) - steps_before,
                           "generated": sum(len(o) for o in outputs.values()), "elapsed_s": elapsed}  # fmt: skip
        texts = {i: self._decode(outputs[i]) for i in ids}
        for i, detok in detoks.items():
            if detok.stopped_by is not None:
                texts[i] = detok.text  # cut before the stop string
        return [
            RequestOutput(prompt, outputs[i], texts[i], reasons.get(i, "length"), logprobs.get(i))
            for i, prompt in zip(ids, prompts)
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
