"""Loading compiled artifacts and running a step through them.

On a CPU the runner calls each bucket's AOTInductor package directly. On a GPU it also captures
each bucket's call once, at load, as a CUDA graph over static input buffers, all graphs sharing
one memory pool, and replays it per step. Either way a step is: pick the bucket, copy the
batch into its buffers (padding the rest), run, return the real tokens' hidden states.
Artifacts built for a model with an MTP layer also hold its graph per bucket (`mtp`), which the
speculative drafter runs the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from glm5c.batch import SeqChunk, StepBatch, build_step_batch
from glm5c.kv_cache import KVCache
from glm5c.model import GLM5
from glm5c.ops import cpu_kernels

from .buckets import Buckets
from .manifest import Manifest, StaleArtifactsError, constants_signature
from .step import StaticInputs, StepModule, cache_args, mtp_cache_args


class GraphRunner:
    def __init__(self, artifacts_dir: str | Path, model: GLM5, model_dir: str | Path) -> None:
        """Load and check `artifacts_dir` for `model` (loaded from `model_dir`); compiles nothing."""
        self.dir = Path(artifacts_dir)
        self.manifest = Manifest.read(self.dir)
        device = model.inv_freq.device
        self.manifest.check(self.dir, model_dir, str(device), str(model.dtype).removeprefix("torch."))
        self.model = model
        self.device = device
        self.buckets = Buckets(tuple(b.tokens for b in self.manifest.buckets))
        self.block_size = self.manifest.block_size
        self.max_blocks = self.manifest.max_blocks
        if any(name.startswith(("moe_cpu.", "cpu_linear.", "dsa_cpu.")) for name in self.manifest.ops.values()):
            cpu_kernels.load()  # build (once per machine: ~1 s, ~5 s for the torch ops) before any step calls them
        step = StepModule(model)
        named = dict(step.named_parameters()) | dict(step.named_buffers())
        if constants_signature(step) != self.manifest.constants_signature:
            raise StaleArtifactsError(
                f"the model's weights (names, shapes or dtypes; blocked for the CPU kernels or not) differ from those "
                f"{self.dir} was compiled for. Rebuild them: "
                + self.manifest.rebuild_command(self.dir, model_dir, str(device), self.manifest.dtype)
            )
        self._packages = {("step", b.tokens): self._load(b, named) for b in self.manifest.buckets}
        if model.mtp is not None:
            self._packages |= {("mtp", b.tokens): self._load(b, named) for b in self.manifest.mtp_buckets}
        self._inputs = {("step", t): StaticInputs(t, self.max_blocks, device) for t in self.buckets.sizes}
        if self.has_mtp:
            hidden = (model.config.hidden_size, model.dtype)
            self._inputs |= {("mtp", t): StaticInputs(t, self.max_blocks, device, hidden) for t in self.buckets.sizes}
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._graph_cache: KVCache | None = None
        self._checked_cache: KVCache | None = None
        self._flat_cache: KVCache | None = None
        self._flat_cache_args: dict[str, tuple[Tensor, ...]] = {}

    def _load(self, bucket, named: dict[str, Tensor]):
        try:
            package = _load_package(self.dir / bucket.file)
            fqns = package.get_constant_fqns()
        except Exception as e:  # a corrupted or foreign package: say which file
            raise StaleArtifactsError(f"cannot load {self.dir / bucket.file}: {type(e).__name__}: {e}") from None
        missing = [f for f in fqns if f not in named]
        if missing:
            raise StaleArtifactsError(f"{bucket.file} expects weights this model lacks: {missing[:5]}")
        constants = {f: named[f] for f in fqns}
        try:  # (constants, use_runtime_constant_folding, check_full_update, user_managed, allow_h2d_copy)
            package.load_constants(constants, False, True, True, False)
        except TypeError:  # torch before 2.13 (the GPU machines' 2.11): no allow_h2d_copy
            package.load_constants(constants, False, True, True)
        return package

    @property
    def graph_memory_bytes(self) -> int:
        """Memory the CUDA graphs will hold (0 on a CPU): they share one pool, captured largest
        first, so about the largest bucket's compile-time estimate; a quarter more for the MTP
        layer's graphs and the pool's fragmentation."""
        estimates = [b.graph_memory_bytes or 0 for b in self.manifest.buckets]
        return int(max(estimates, default=0) * 1.25)

    @property
    def has_mtp(self) -> bool:
        """Whether the artifacts hold the MTP layer's graphs (one per bucket)."""
        return bool(self.manifest.mtp_buckets) and self.model.mtp is not None

    def require_mtp(self) -> None:
        """Speculative decoding runs the MTP layer through these artifacts: refuse ones without its
        graphs (built with --no-mtp, or before glm5c compiled it) with the command that rebuilds them."""
        if self.model.mtp is not None and not self.has_mtp:
            m = self.manifest
            raise StaleArtifactsError(
                f"artifacts in {self.dir} hold no graphs for the MTP layer, which speculative decoding runs"
                + (" (built with --no-mtp). " if m.mtp_left_out else ". ")
                + "Rebuild them: " + m.rebuild_command(self.dir, m.model_dir, m.device, m.dtype, mtp=True)
            )

    @property
    def index_dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest.index_cache_dtype)

    def new_cache(self, num_blocks: int) -> KVCache:
        return KVCache(self.model.config, num_blocks, self.block_size, self.model.dtype, self.device,
                       index_dtype=self.index_dtype)  # fmt: skip

    def __call__(self, batch: StepBatch, cache: KVCache) -> Tensor:
        """-> hidden [batch.num_tokens, D], as `model(batch, cache)` computes it."""
        return self._step("step", batch, cache)

    def stage(self, chunks: Sequence[SeqChunk], cache: KVCache) -> tuple[tuple[str, int], int]:
        """A step's first half: the chunks laid out in their bucket's buffers (on a CPU straight from
        the chunks: StaticInputs.fill_chunks), as self(build_step_batch(chunks, ...)) lays them out.
        -> what run_staged takes: (bucket key, tokens)."""
        self._check_cache(cache)
        tokens = sum(len(c.token_ids) for c in chunks)
        key = ("step", self.buckets.pick(tokens))
        if self.device.type == "cuda":
            self._inputs[key].fill(build_step_batch(chunks, self.block_size, cache.pad_slot, self.device),
                                   cache.pad_slot, self.block_size)  # fmt: skip
        else:
            self._inputs[key].fill_chunks(chunks, self.block_size, cache.pad_slot, self.manifest.min_table_blocks)
        return key, tokens

    def run_staged(self, staged: tuple[tuple[str, int], int], cache: KVCache) -> Tensor:
        """A step's second half: its graph over the staged buffers -> hidden [tokens, D]."""
        key, tokens = staged
        if self.device.type == "cuda":
            return self._replay(key, cache)[:tokens]
        return self._run(key, cache)[:tokens]

    def mtp(self, batch: StepBatch, cache: KVCache, hidden: Tensor) -> Tensor:
        """-> the MTP layer's hidden states [batch.num_tokens, D], as `model.mtp_hidden` computes them."""
        if not self.has_mtp:
            raise RuntimeError(f"{self.dir} holds no MTP graphs")
        return self._step("mtp", batch, cache, hidden)

    def _check_cache(self, cache: KVCache) -> None:
        if cache is self._checked_cache:  # (every step's: checked once)
            return
        if cache.block_size != self.block_size:
            raise ValueError(f"cache block size {cache.block_size} != the artifacts' {self.block_size}")
        if cache.index_k[0].dtype != self.index_dtype:
            raise ValueError(f"cache index keys are {cache.index_k[0].dtype}, the artifacts read {self.index_dtype}")
        self._checked_cache = cache

    def _step(self, kind: str, batch: StepBatch, cache: KVCache, hidden: Tensor | None = None) -> Tensor:
        self._check_cache(cache)
        key = (kind, self.buckets.pick(batch.num_tokens))
        inputs = self._inputs[key]
        if self.device.type == "cuda":
            inputs.fill(batch, cache.pad_slot, self.block_size, hidden)
            return self._replay(key, cache)[: batch.num_tokens]
        # a CPU reads only as far as the step's longest sequence (CUDA graphs were captured at full width)
        width = max(self.manifest.min_table_blocks, batch.block_tables.shape[1])
        inputs.fill(batch, cache.pad_slot, self.block_size, hidden, width)
        return self._run(key, cache)[: batch.num_tokens]

    def _cache_args(self, kind: str, cache: KVCache) -> tuple[Tensor, ...]:
        """The cache's tensors a `kind` graph takes, flat in its argument order (kept per cache)."""
        if self._flat_cache is not cache:
            self._flat_cache, self._flat_cache_args = cache, {}
        flat = self._flat_cache_args.get(kind)
        if flat is None:
            make = cache_args if kind == "step" else mtp_cache_args
            flat = self._flat_cache_args[kind] = tuple(t for part in make(cache, self.model.config.num_hidden_layers)
                                                       for t in part)  # fmt: skip
        return flat

    def _run(self, key: tuple[str, int], cache: KVCache) -> Tensor:
        """Call the package's loader with the inputs flat, in StepModule's (or MTPStepModule's)
        order: the bucket's buffers as the last fill laid them out, then the cache's tensors."""
        return self._packages[key].boxed_run([*self._inputs[key].args(), *self._cache_args(key[0], cache)])[0]

    def _replay(self, key: tuple[str, int], cache: KVCache) -> Tensor:
        """CUDA graphs read fixed addresses: the engine captures every bucket against its cache at
        load (one shared memory pool); a step on another cache captures against that one first."""
        if self._graph_cache is not cache:
            self.capture(cache, keep=key)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def capture(self, cache: KVCache, keep: tuple[str, int] | None = None) -> None:
        """Capture every graph against `cache`. Warming up runs each graph once for real: all but
        `keep` (the bucket holding the current step) first get inputs that only touch the
        scratch block, so no warm-up writes into a sequence's cache entries."""
        self._graphs.clear()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # largest first, so smaller ones reuse its pool; MTP graphs after the main ones
        for key in sorted(self._packages, key=lambda k: (k[0] != "step", -k[1])):
            if key != keep:
                self._inputs[key].clear(cache.pad_slot, self.block_size)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._run(key, cache)  # warm up outside the graph
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._run(key, cache)
            self._graphs[key] = (graph, out)
        self._graph_cache = cache


def _load_package(path: Path) -> torch._C._aoti.AOTIModelPackageLoader:
    """An AOTInductor package's loader, called directly. Not `aoti_load_package` (nor its
    AOTICompiledModel wrapper): importing torch._inductor for those imports Dynamo and the
    compiler, ~2 s of every start, and before loading it probes the CPU's vector ISA by compiling
    C++ test programs (~6 s and a C++ compiler on a fresh machine) only to warn on a mismatch,
    which the manifest check has already ruled out."""
    # (path, model name, run_single_threaded, num_runners, device_index). Single-threaded: the
    # multi-runner container queries and records a CUDA event around every run, which a stream
    # under CUDA-graph capture refuses (and which this one-caller runner does not need).
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)
