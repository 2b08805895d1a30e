"""The step-level engine: add_request / abort / step, no sockets. One step = schedule -> build
the flat batch -> run the model (a compiled bucket's graph when artifacts are given) -> sample ->
append tokens and finish sequences. `LLM.generate` and the serving worker both drive it."""

from __future__ import annotations

import atexit
import gc
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .batch import SeqChunk, build_step_batch, logits_rows
from .block_manager import BlockManager
from .config import ModelConfig
from .kv_cache import KVCache
from .mtp import CatchUp, Drafter, verify
from .ops import REFERENCE, Ops
from .sampling import SamplingBatch, SamplingParams, argmax_tokens, sample
from .scheduler import Chunk, PromptTooLongError, Scheduler, Sequence
from .weights import build_model

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # default: sized from memory (see default_num_blocks)
    max_tokens_per_step: int = 256
    max_seqs: int = 256
    max_waiting: int = 4096
    prefix_caching: bool = True
    num_speculative_tokens: int = 0  # MTP drafts per decoding request; 0 = off
    fp8_index_cache: bool = False  # indexer keys as FP8 + a per-token scale (compiled: the artifacts decide)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_tokens_per_step", "max_seqs", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig.num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"EngineConfig.num_speculative_tokens must be in [0, 16], got {self.num_speculative_tokens}")


class StepOutput(NamedTuple):
    """One request's part of a step's result. (A named tuple: one per request per step, built in a
    fifth of a frozen dataclass's time.)"""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None while running
    # when the request asked for logprobs: per new token, its logprob and the top-n {id: logprob}
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    first_scheduled_s: float = 0.0  # time.monotonic() when the request first entered a step
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Engine:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        config: EngineConfig = EngineConfig(),
        artifacts: str | Path | None = None,
        ops: Ops = REFERENCE,
        keep_fp8: bool = True,
    ) -> None:
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        from .graphs.compile import compile_count  # (imports no compiler)

        self._compiles_at_start = compile_count()
        self.runner = None
        if artifacts is not None:
            from .graphs.compile import compiled_ops
            from .graphs.manifest import Manifest

            manifest = Manifest.read(artifacts)
            ops = compiled_ops(manifest, artifacts)
            keep_fp8 = keep_fp8 and manifest.dtype != "bfloat16"  # grouped GEMM experts take dequantized weights
        self.model = build_model(model_dir, dtype=dtype, device=self.device, ops=ops, keep_fp8=keep_fp8)
        self.model_config: ModelConfig = self.model.config
        block_size, max_tokens = config.block_size, config.max_tokens_per_step
        self.max_model_len = self.model_config.max_position_embeddings
        if artifacts is not None:
            from .graphs.runner import GraphRunner

            self.runner = GraphRunner(artifacts, self.model, model_dir)
            block_size = self.runner.block_size
            max_tokens = min(max_tokens, self.runner.buckets.largest)
            self.max_model_len = self.runner.manifest.max_model_len
        graphs_bytes = self.runner.graph_memory_bytes if self.runner is not None else 0
        num_blocks = config.num_blocks or default_num_blocks(
            self.model_config, block_size, self.model.dtype, self.device, self.max_model_len, config.max_seqs,
            reserve_bytes=graphs_bytes,
        )
        index_dtype = torch.float8_e4m3fn if config.fp8_index_cache else None
        if self.runner is not None:
            index_dtype = self.runner.index_dtype
        self.cache = KVCache(self.model_config, num_blocks, block_size, self.model.dtype, self.device,
                             index_dtype=index_dtype)  # fmt: skip
        if self.runner is not None and self.device.type == "cuda":
            self.runner.capture(self.cache)  # at load, not in the first request's time to first token
        self.blocks = BlockManager(num_blocks, block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_tokens, config.max_seqs, config.max_waiting)
        k = config.num_speculative_tokens
        self.drafter = None
        if k:
            compiled_mtp = None
            if self.runner is not None:
                self.runner.require_mtp()
                compiled_mtp = self.runner.mtp
            self.drafter = Drafter(self.model, self.cache, self.blocks, k, compiled_mtp)
        self.eos = set(self.model_config.eos_token_ids)
        self._active: set[str] = set()  # request ids queued or running
        self._arrivals = itertools.count()
        self.step_times_s: list[float] = []
        self.generated_tokens = 0
        self.forward_times_s: list[float] = []
        self.draft_times_s: list[float] = []  # per step with MTP on: catch-up and drafting

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. Raises ValueError for a bad prompt and QueueFullError when the queue is full."""
        vocab = self.model_config.vocab_size
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token ids outside [0, {vocab}): {bad[:5]}")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"request {request_id!r}: {len(prompt_token_ids)} prompt tokens + max_tokens {params.max_tokens} "
                f"exceed the context of {self.max_model_len}"
            )
        if request_id in self._active:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, len(prompt_token_ids), list(prompt_token_ids), params, next(self._arrivals))
        self.scheduler.add(seq)
        self._active.add(request_id)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks. -> whether it was still queued or running."""
        self._active.discard(request_id)
        return self.scheduler.abort(request_id) is not None

    def stats(self) -> dict[str, float]:
        """A snapshot for monitoring: queue lengths, KV blocks, prefix-cache hits, tokens generated,
        graphs compiled since the engine started (0 with valid artifacts), MTP acceptance."""
        from .graphs.compile import compile_count

        cache = self.blocks.stats
        drafts = self.drafter.stats if self.drafter is not None else None
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "kv_blocks_free": self.blocks.num_free_blocks, "kv_blocks_total": self.blocks.num_blocks,
            "prefix_cache_hit_rate": cache.hit_blocks / cache.queried_blocks if cache.queried_blocks else 0.0,
            "generated_tokens": self.generated_tokens, "max_model_len": self.max_model_len,
            "vocab_size": self.model_config.vocab_size, "compilations": compile_count() - self._compiles_at_start,
            "draft_acceptance_rate": drafts.acceptance_rate if drafts else 0.0,
            "draft_mean_accept_length": drafts.mean_accept_length if drafts else 0.0,
        }  # fmt: skip

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        start = time.perf_counter()
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        bs = self.blocks.block_size
        seq_chunks = [
            SeqChunk(c.token_ids, c.start, self.blocks.tables[c.seq.id], want_logits=c.needs_logits,
                     all_logits=c.needs_logits and bool(c.seq.draft))  # fmt: skip
            for c in chunks
        ]
        with torch.inference_mode():
            if self.runner is not None:  # laid out into the bucket's buffers, then its graph
                staged = self.runner.stage(seq_chunks, self.cache)
                t = time.perf_counter()
                hidden = self.runner.run_staged(staged, self.cache)
            else:  # block tables as wide as the longest sequence needs
                batch = build_step_batch(seq_chunks, bs, self.cache.pad_slot, self.device)
                t = time.perf_counter()
                hidden = self.model(batch, self.cache)
            rows = logits_rows(seq_chunks)  # None: every token's (a decode step), no gather needed
            logits = self.model.logits(hidden if rows is None else hidden[rows])  # [N, vocab]
        if self.device.type == "cuda":  # time the forward, not its launch (sampling syncs right after anyway)
            torch.cuda.synchronize(self.device)
        self.forward_times_s.append(time.perf_counter() - t)
        outputs, catch_ups = self._advance(chunks, hidden, logits)
        if self.drafter is not None:
            t = time.perf_counter()
            self.drafter.catch_up_and_draft(catch_ups)
            self.draft_times_s.append(time.perf_counter() - t)
        self.step_times_s.append(time.perf_counter() - start)
        return outputs

    def _advance(
        self, chunks: list[Chunk], hidden: torch.Tensor, logits: torch.Tensor
    ) -> tuple[list[StepOutput], list[CatchUp]]:
        """Sample (or verify drafts), append tokens, finish sequences. -> outputs, and the positions
        each sequence validly computed this step with their hidden states (with an MTP drafter: it
        catches up on them; without one none are listed)."""
        # one batched sampling call for every sequence that samples a plain next token
        sampling = [c.seq for c in chunks if c.needs_logits and not c.seq.draft]
        # a sampling chunk has one row of logits, a verifying one 1 + k: all rows sample unless some verifies
        verifies = len(sampling) < logits.shape[0]
        first_rows = self._logit_rows(chunks) if verifies else []
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, tuple[float, dict[int, float]]] = {}
        if sampling:
            if verifies:
                rows = [r for r, c in zip(first_rows, chunks) if c.needs_logits and not c.seq.draft]
                picked = logits[rows]  # [N, V]
            else:
                picked = logits
            if all(s.params.argmax_only for s in sampling):
                # plain greedy (sample's result for such rows): no sampling tensors to build, ~0.15 ms
                # of a 16-request step on the 2-core dev machine
                sampled = {s.id: [t] for s, t in zip(sampling, argmax_tokens(picked))}
            else:
                penalized = any(s.params.penalized for s in sampling)  # (only penalties read the token lists)
                batch = SamplingBatch.from_params(
                    [s.params for s in sampling], [s.output if penalized else [] for s in sampling],
                    [s.tokens[: s.prompt_len] if penalized else [] for s in sampling], [len(s.tokens) for s in sampling],
                    logits.shape[-1], logits.device,
                )  # fmt: skip
                result = sample(picked, batch)
                sampled = {s.id: [t] for s, t in zip(sampling, result.token_ids.tolist())}
                logprobs = _logprobs_by_request(sampling, result)
        # one rejection-sampling call for every sequence verifying drafts
        verifying = [(r, c) for r, c in zip(first_rows, chunks) if c.needs_logits and c.seq.draft]
        if verifying:  # (none unless verifies)
            k1 = verifying[0][1].num_tokens  # 1 + k, the same for every drafting sequence
            target = torch.stack([logits[r : r + k1] for r, _ in verifying])  # [N, 1 + k, V]
            for (_, c), tokens in zip(verifying, verify([c.seq for _, c in verifying], target)):
                sampled[c.seq.id] = tokens

        outputs, catch_ups = [], []
        offset = 0
        block_size = self.blocks.block_size
        for chunk in chunks:
            seq, first_row = chunk.seq, offset
            offset += chunk.num_tokens
            new_tokens: list[int] = sampled[seq.id] if chunk.needs_logits else []
            valid = chunk.num_tokens
            if seq.draft:  # (a verifying chunk: it reaches the drafts) positions of accepted drafts stay computed
                valid = len(new_tokens)
                self.drafter.stats.accepted += valid - 1
                self.drafter.stats.verify_steps += 1
                seq.draft, seq.draft_probs = [], None
            before = seq.num_computed
            seq.num_computed += valid
            if seq.num_computed // block_size > before // block_size:  # a block filled up: the prefix cache may take it
                self.blocks.cache_full_blocks(seq.id, seq.tokens, seq.num_computed)
            emitted = self._append(seq, new_tokens)
            if seq.finish_reason is None and self.drafter is not None:  # (only the drafter reads them)
                catch_ups.append(CatchUp(seq, chunk.start, hidden[first_row : first_row + valid], chunk.needs_logits))
            if emitted:
                self.generated_tokens += len(emitted)
                lp = [logprobs[seq.id]] if logprobs and seq.id in logprobs else None
                outputs.append(StepOutput(seq.id, emitted, seq.finish_reason is not None, seq.finish_reason, lp,
                                          seq.first_scheduled_s or 0.0, seq.cached_tokens))  # fmt: skip
        return outputs, catch_ups

    @staticmethod
    def _logit_rows(chunks: list[Chunk]) -> list[int]:
        """Each chunk's first row in the step's logits (a verifying chunk has 1 + k rows, a
        sampling chunk 1, others none)."""
        rows, row = [], 0
        for c in chunks:
            rows.append(row)
            row += (c.num_tokens if c.seq.draft else 1) if c.needs_logits else 0
        return rows

    def _append(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Append tokens until a stop: an eos or stop token (kept), or max_tokens."""
        params = seq.params
        for i, token in enumerate(tokens):
            seq.tokens.append(token)
            if (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids:
                self._finish(seq, "stop")
            elif seq.num_output >= params.max_tokens:
                self._finish(seq, "length")
            if seq.finish_reason is not None:
                return tokens[: i + 1]
        return tokens

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._active.discard(seq.id)


def _logprobs_by_request(seqs: list[Sequence], result) -> dict[str, tuple[float, dict[int, float]]]:
    """The chosen token's logprob and each request's own top-n, for the requests that asked."""
    asked = [(i, s) for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not asked:
        return {}
    chosen = result.logprobs.tolist()
    top_ids = result.top_ids.tolist() if result.top_ids is not None else None
    top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    out = {}
    for i, s in asked:
        n = s.params.logprobs
        top = dict(zip(top_ids[i][:n], top_values[i][:n])) if n and top_ids is not None else {}
        out[s.id] = (chosen[i], top)
    return out


def default_num_blocks(
    config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device, max_model_len: int, max_seqs: int,
    reserve_bytes: int = 0,
) -> int:
    """Blocks for the KV cache: on a GPU 90% of the memory still free after the weights and
    `reserve_bytes` (the CUDA graphs, captured after the cache exists), on a CPU 256 MiB or an
    eighth of the available memory, whichever is smaller (pass EngineConfig.num_blocks for more);
    never more than max_seqs full-length sequences."""
    probe = KVCache(config, 1, block_size, dtype, "meta")
    bytes_per_block = probe.bytes_per_token * block_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(max(free - reserve_bytes, 0) * 0.9)
    else:
        budget = min(_available_memory_bytes() // 8, 256 << 20)
    wanted = max_seqs * -(-max_model_len // block_size)
    return max(1, min(budget // bytes_per_block, wanted))


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def freeze_startup_heap() -> None:
    """For a process that builds its engine once and then serves or benchmarks with it: move every
    object alive now (the model, torch's and transformers' modules: ~240k objects with the mini
    preset) out of the cyclic garbage collector's view, so that a full collection scans only what
    serving allocates. Measured on the 2-core dev machine, mini preset and artifacts loaded: a full
    collection took 174-195 ms before, ~0 after; one in a serving step stalls every request in it.
    (vLLM freezes its startup heap too.) They are unfrozen at exit, so shutdown collects them."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)
