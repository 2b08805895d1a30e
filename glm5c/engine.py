"""The step-level engine: add_request / abort / step, no sockets. One step = schedule -> build
the flat batch -> run the model (a compiled bucket's graph when artifacts are given) -> sample ->
append tokens and finish sequences. `LLM.generate` and the serving worker both drive it."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .batch import SeqChunk, build_step_batch
from .block_manager import BlockManager
from .config import ModelConfig
from .kv_cache import KVCache
from .ops import REFERENCE, Ops
from .sampling import SamplingParams, sample
from .scheduler import Chunk, Scheduler, Sequence
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

    def __post_init__(self) -> None:
        for name in ("block_size", "max_tokens_per_step", "max_seqs", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig.num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None while running


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
        self.runner = None
        if artifacts is not None:
            from .graphs.compile import compiled_ops
            from .graphs.manifest import Manifest

            ops = compiled_ops(Manifest.read(artifacts))
            keep_fp8 = keep_fp8 and self.device.type != "cuda"  # the GPU graphs take dequantized experts for now
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
        num_blocks = config.num_blocks or default_num_blocks(
            self.model_config, block_size, self.model.dtype, self.device, self.max_model_len, config.max_seqs
        )
        self.cache = KVCache(self.model_config, num_blocks, block_size, self.model.dtype, self.device)
        self.blocks = BlockManager(num_blocks, block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_tokens, config.max_seqs, config.max_waiting)
        self.eos = set(self.model_config.eos_token_ids)
        self._generators: dict[str, torch.Generator | None] = {}
        self._arrivals = itertools.count()
        self.step_times_s: list[float] = []
        self.forward_times_s: list[float] = []

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
            raise ValueError(
                f"request {request_id!r}: {len(prompt_token_ids)} prompt tokens + max_tokens {params.max_tokens} "
                f"exceed the context of {self.max_model_len}"
            )
        if request_id in self._generators:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, len(prompt_token_ids), list(prompt_token_ids), params, next(self._arrivals))
        self.scheduler.add(seq)
        self._generators[request_id] = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks. -> whether it was still queued or running."""
        self._generators.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

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
            SeqChunk(c.seq.tokens[c.start : c.start + c.num_tokens], c.start, self.blocks.tables[c.seq.id],
                     want_logits=c.needs_logits)  # fmt: skip
            for c in chunks
        ]
        max_blocks = self.runner.max_blocks if self.runner else None
        batch = build_step_batch(seq_chunks, bs, self.cache.pad_slot, self.device, max_blocks=max_blocks)
        t = time.perf_counter()
        with torch.inference_mode():
            hidden = self.runner(batch, self.cache) if self.runner else self.model(batch, self.cache)
            logits = self.model.logits(hidden[batch.logits_indices])  # [N, vocab]
        self.forward_times_s.append(time.perf_counter() - t)
        outputs = self._advance(chunks, logits)
        self.step_times_s.append(time.perf_counter() - start)
        return outputs

    def _advance(self, chunks: list[Chunk], logits: torch.Tensor) -> list[StepOutput]:
        outputs = []
        row = 0
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed += chunk.num_tokens
            self.blocks.cache_full_blocks(seq.id, seq.tokens, seq.num_computed)
            if not chunk.needs_logits:
                continue
            token = sample(logits[row], seq.params, self._generators.get(seq.id))
            row += 1
            seq.tokens.append(token)
            params = seq.params
            if (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids:
                self._finish(seq, "stop")
            elif len(seq.output) >= params.max_tokens:
                self._finish(seq, "length")
            outputs.append(StepOutput(seq.id, [token], seq.finish_reason is not None, seq.finish_reason))
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._generators.pop(seq.id, None)


def default_num_blocks(
    config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device, max_model_len: int, max_seqs: int
) -> int:
    """Blocks for the KV cache: on a GPU 90% of the memory still free after weights and graphs,
    on a CPU 256 MiB or an eighth of the available memory, whichever is smaller (pass
    EngineConfig.num_blocks for more); never more than max_seqs full-length sequences."""
    probe = KVCache(config, 1, block_size, dtype, "meta")
    bytes_per_block = probe.bytes_per_token * block_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.9)
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
