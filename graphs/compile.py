"""Ahead-of-time compilation: one AOTInductor package per token bucket.

Why AOTInductor (`torch.export` + `aoti_compile_and_package`): its packages are shared libraries
that load in ~0.1 s in a fresh process, run with no compiler or Python-level tracing at load
(so a valid artifact directory means zero compilations at start-up), and carry no weights
(`package_constants_in_so=False`): the loaded model's own parameters are handed over by name
(`load_constants(..., user_managed=True)`, zero-copy). The alternatives measured on these machines
(environment.md) either re-trace with Dynamo at every start (torch.compile + a shipped inductor
cache), rebuild kernels (the cache-artifact blob), or need g++ at load (aot_compile).
What AOTInductor does not do — check input shapes, or notice a weight of the wrong shape — the
runner and the manifest do.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

import glm5c
from glm5c.batch import SeqChunk, build_step_batch
from glm5c.config import ModelConfig
from glm5c.kv_cache import KVCache
from glm5c.ops import REFERENCE, Ops, cpu_linear, dsa, dsa_cpu, linear_cpu, moe, moe_cpu
from glm5c.weights import build_model

from .buckets import Buckets
from .manifest import (
    FORMAT,
    MANIFEST_FILE,
    BucketArtifact,
    Manifest,
    StaleArtifactsError,
    config_hash,
    constants_signature,
    environment,
    file_sha256,
    weight_fingerprint,
)
from .step import MTPStepModule, StaticInputs, StepModule, cache_args, mtp_cache_args

# What the graphs are built from. Every op must have static shapes; on a GPU also no host sync,
# so CUDA graphs can capture it. Experts run as torch's grouped GEMM, which takes BF16 only; in
# other dtypes (CPU exactness runs in fp32) the data-dependent reference loop is wrapped as one
# opaque custom op instead, which only a CPU can hold. A CPU's BF16 graphs pick per bucket: the
# experts (moe_cpu.experts: a C++ kernel reading each chosen expert once, as an opaque op, over expert
# stacks blocked at load where it has AVX512-BF16 (Ops.pack_experts); on unblocked stacks Inductor's
# gathered loops for 1 token), linears (cpu_linear.linear_cpu, and linear_many_cpu for those reading
# the same x: weights blocked at load
# (Ops.pack_linear) by a C++ kernel at any rows; unblocked, a fused matrix-vector loop for 1 row,
# then a C++ kernel up to 512 rows, per-head ones at any), attention (dsa_cpu.sparse_mla: a C++ kernel) and the
# indexer's top-k (dsa_cpu.indexer_topk: a C++ kernel for a BF16 index cache; skipped with its
# queries in a step whose tokens all see at most index_topk keys: Ops.indexer_skips_short), the
# router (moe_cpu.route: a C++ kernel), and the shared expert inside the experts' kernel call
# (moe_cpu.experts_shared).
# Fast kernels take their places here.
_BASE_NAMES = {"linear": "linear_ref", "route": "route_ref", "indexer_topk": "indexer_topk_ref",
               "sparse_mla": "sparse_mla_ref"}  # fmt: skip
_GROUPED = (dataclasses.replace(REFERENCE, experts=moe.experts_grouped_mm), {**_BASE_NAMES, "experts": "experts_grouped_mm"})
_CPU_BF16 = (dataclasses.replace(REFERENCE, linear=linear_cpu, linear_many=cpu_linear.linear_many_cpu,
                                 route=moe_cpu.route, experts=moe_cpu.experts, experts_shared=moe_cpu.experts_shared,
                                 sparse_mla=dsa_cpu.sparse_mla, indexer_topk=dsa_cpu.indexer_topk,
                                 pack_experts=moe_cpu.pack_experts, pack_linear=cpu_linear.pack_linear,
                                 indexer_skips_short=True),
             {**_BASE_NAMES, "linear": "cpu_linear.linear_cpu", "linear_many": "cpu_linear.linear_many_cpu",
              "route": "moe_cpu.route", "experts": "moe_cpu.experts", "experts_shared": "moe_cpu.experts_shared",
              "sparse_mla": "dsa_cpu.sparse_mla", "indexer_topk": "dsa_cpu.indexer_topk",
              "indexer_skips_short": "torch.cond"})  # fmt: skip
_OPAQUE = (dataclasses.replace(REFERENCE, experts=moe.experts_op), {**_BASE_NAMES, "experts": "glm5c::moe_experts"})


def ops_for(device: str, dtype: str) -> tuple[Ops, dict[str, str]]:
    """The op set compiled into graphs for this device and dtype, and its names for the manifest."""
    if dtype == "bfloat16":
        return _GROUPED if device.startswith("cuda") else _CPU_BF16
    if device.startswith("cuda"):
        raise ValueError(f"GPU graphs need bfloat16 weights (torch's grouped GEMM), not {dtype}")
    return _OPAQUE


def compiled_ops(manifest: Manifest, artifacts_dir: str | Path) -> Ops:
    """The ops the model runs beside artifacts built with `manifest`'s; refuses artifacts whose
    graphs hold other ops (an older glm5c's choices) with the command that rebuilds them."""
    ops, names = ops_for(manifest.device, manifest.dtype)
    if manifest.ops != names:
        differ = "; ".join(f"{op}: built with {manifest.ops.get(op)!r}, now {names.get(op)!r}"
                           for op in sorted(set(names) | set(manifest.ops)) if manifest.ops.get(op) != names.get(op))  # fmt: skip
        raise StaleArtifactsError(
            f"artifacts in {artifacts_dir} were compiled with other ops ({differ}). Rebuild them: "
            + manifest.rebuild_command(artifacts_dir, manifest.model_dir, manifest.device, manifest.dtype)
        )
    return ops


def min_table_blocks(config, block_size: int, max_blocks: int) -> int:
    """The narrowest block table a graph takes: enough positions for index_topk keys, so the
    indexer's top-k never has fewer candidates than it selects (a shape the graph fixes)."""
    return min(max_blocks, -(-config.index_topk // block_size))


def export_step(model, tokens: int, max_blocks: int, block_size: int, device: torch.device, index_dtype,
                mtp: bool = False):  # fmt: skip
    """torch.export of one bucket's step (`mtp`: of the MTP layer's step, MTPStepModule), with the
    cache's block count and the block tables' width left dynamic: a step reads keys only as far as
    its longest sequence needs (no shorter than min_table_blocks), not the whole max_model_len."""
    config = model.config
    layers = config.num_layers_with_mtp if mtp else config.num_hidden_layers
    cache = KVCache(config, 2, block_size, model.dtype, device, layers, index_dtype)
    hidden = (config.hidden_size, model.dtype) if mtp else None
    inputs = _example_inputs(tokens, max_blocks, block_size, cache.pad_slot, device, hidden)
    caches = (mtp_cache_args if mtp else cache_args)(cache, config.num_hidden_layers)
    blocks = torch.export.Dim("cache_blocks", min=2)
    narrowest = min_table_blocks(config, block_size, max_blocks)
    width = {1: torch.export.Dim("table_blocks", min=narrowest, max=max_blocks)} if narrowest < max_blocks else None
    args = inputs.args()  # token_ids, positions, seq_ids, slot_mapping, block_tables, seq_lens[, hidden]
    dynamic = (None,) * 4 + (width,) + (None,) * (len(args) - 5) + tuple([{0: blocks}] * len(c) for c in caches)
    module = MTPStepModule(model) if mtp else StepModule(model)
    return torch.export.export(module, (*args, *caches), dynamic_shapes=dynamic, strict=False)


def _example_inputs(tokens: int, max_blocks: int, block_size: int, pad_slot: int, device, hidden=None) -> StaticInputs:
    """A full bucket of one-token sequences (only shapes and dtypes matter to the compiler)."""
    inputs = StaticInputs(tokens, max_blocks, device, hidden)
    chunks = [SeqChunk([1], 0, [0]) for _ in range(tokens)]
    states = None if hidden is None else torch.zeros(tokens, hidden[0], dtype=hidden[1], device=device)
    inputs.fill(build_step_batch(chunks, block_size, pad_slot, device), pad_slot, block_size, states)
    return inputs


def compile_artifacts(
    model_dir: str | Path,
    out_dir: str | Path,
    buckets: Buckets,
    device: str = "cpu",
    dtype: str | None = None,
    block_size: int = 16,
    max_model_len: int | None = None,
    fp8_index_cache: bool = False,
    mtp: bool = True,
    progress: Callable[[str], None] = print,
    op_set: tuple[Ops, dict[str, str]] | None = None,
) -> Manifest:
    """Compile every bucket into out_dir (replacing an older artifact directory there) and write
    the manifest last, atomically: an interrupted compile leaves no directory that looks valid.
    `op_set` (ops, their names) replaces ops_for's choice, for experiments that time other ops
    (bench/cpu_graph_ops.py); an engine refuses such artifacts (its ops differ from ops_for's).
    `mtp`: also compile the MTP layer's graph per bucket (when the checkpoint has the layer)."""
    _count_inductor_compiles()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{out_dir} exists, is not empty and is not a glm5c artifact directory")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    torch_device = torch.device(device)
    dtype = dtype or ModelConfig.from_model_dir(model_dir).dtype
    ops, op_names = op_set or ops_for(device, dtype)
    model = build_model(model_dir, dtype=getattr(torch, dtype), device=torch_device, ops=ops,
                        keep_fp8=dtype != "bfloat16")  # grouped GEMM experts take dequantized weights  # fmt: skip
    config = model.config
    max_model_len = max_model_len or min(config.max_position_embeddings, 8192)
    if not 1 <= max_model_len <= config.max_position_embeddings:
        raise ValueError(f"max_model_len must be in [1, {config.max_position_embeddings}], got {max_model_len}")
    max_blocks = -(-max_model_len // block_size)
    dtype_name = str(model.dtype).removeprefix("torch.")
    index_dtype = torch.float8_e4m3fn if fp8_index_cache else model.dtype

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "glm5c-inductor-cache"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    artifacts: list[BucketArtifact] = []
    mtp_artifacts: list[BucketArtifact] = []
    start = time.perf_counter()

    inductor_configs = {"aot_inductor.package_constants_in_so": False}
    if torch_device.type == "cpu":
        # Inductor's own loops split across threads only when each gets 16k elements (its default:
        # 512), so a decode step's norms and elementwise ops (16 x 512 at mini's batch 16) fork no
        # threads: a fork and join cost as much as such a loop, more when the VM puts the threads
        # on different CCDs. Mini's decode steps, both builds in one process, interleaved
        # (bench/ab_artifacts.py, 10 rounds, 2-core dev machine, 2026-11-30): 0.966x the time at 16
        # requests, 0.978x at 4, 0.997x and 0.948x at 1 (two runs); prefill unchanged.
        inductor_configs["cpp.min_chunk_size"] = 16384

    def package(program, name: str) -> float:
        t = time.perf_counter()
        torch._inductor.aoti_compile_and_package(program, package_path=str(stage / name), inductor_configs=inductor_configs)
        return time.perf_counter() - t

    try:
        for i, tokens in enumerate(buckets.sizes, 1):
            t = time.perf_counter()
            program = export_step(model, tokens, max_blocks, block_size, torch_device, index_dtype)
            name = f"step_{tokens}.pt2"
            package(program, name)
            seconds = time.perf_counter() - t
            artifacts.append(BucketArtifact(tokens, name, file_sha256(stage / name), round(seconds, 2),
                                            _graph_memory(model, tokens, max_blocks, block_size, torch_device,
                                                          index_dtype)))  # fmt: skip
            line = f"[{i}/{len(buckets.sizes)}] bucket {tokens:5d} tokens compiled in {seconds:6.1f} s"
            if mtp and model.mtp is not None:  # the MTP layer's graph for the same bucket (speculative decoding)
                t = time.perf_counter()
                program = export_step(model, tokens, max_blocks, block_size, torch_device, index_dtype, mtp=True)
                mtp_name = f"mtp_{tokens}.pt2"
                package(program, mtp_name)
                mtp_seconds = time.perf_counter() - t
                mtp_artifacts.append(BucketArtifact(tokens, mtp_name, file_sha256(stage / mtp_name),
                                                    round(mtp_seconds, 2)))  # fmt: skip
                line += f" (+ MTP layer {mtp_seconds:5.1f} s)"
            progress(line)
        manifest = Manifest(
            format=FORMAT,
            glm5c_version=glm5c.__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model_dir=str(Path(model_dir).resolve()),
            config_hash=config_hash(model_dir),
            weight_fingerprint=weight_fingerprint(model_dir),
            dtype=dtype_name,
            **environment(device),
            block_size=block_size,
            max_model_len=max_model_len,
            min_table_blocks=min_table_blocks(config, block_size, max_blocks),
            index_cache_dtype=str(index_dtype).removeprefix("torch."),
            ops=op_names,
            constants_signature=constants_signature(StepModule(model)),
            buckets=artifacts,
            mtp_buckets=mtp_artifacts,
            mtp_left_out=not mtp and model.mtp is not None,
            compile_s=round(time.perf_counter() - start, 2),
        )
        manifest.write(stage)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.chmod(0o755)  # mkdtemp made it private
        os.rename(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _graph_memory(model, tokens: int, max_blocks: int, block_size: int, device: torch.device, index_dtype) -> int | None:
    """Memory a CUDA graph of this bucket will hold: the peak allocated during one eager step
    beyond what existed before it (weights and cache excluded). None on a CPU."""
    if device.type != "cuda":
        return None
    config = model.config
    cache = KVCache(config, 2, block_size, model.dtype, device, config.num_hidden_layers, index_dtype)
    inputs = _example_inputs(tokens, max_blocks, block_size, cache.pad_slot, device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        StepModule(model)(*inputs.args(), *cache_args(cache, config.num_hidden_layers))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


_inductor_compiles = 0


def _count_inductor_compiles() -> None:
    """Count every Inductor graph compilation in this process from now on (torch.compile and
    AOTInductor both go through compile_fx's `_compile_fx_inner`, looked up at call time)."""
    import torch._inductor.compile_fx as compile_fx

    original = compile_fx._compile_fx_inner
    if getattr(original, "glm5c_counted", False):
        return

    def counted(*args, **kwargs):
        global _inductor_compiles
        _inductor_compiles += 1
        return original(*args, **kwargs)

    counted.glm5c_counted = True
    compile_fx._compile_fx_inner = counted


if "torch._inductor.compile_fx" in sys.modules:  # else: installed by the first compile_artifacts
    _count_inductor_compiles()


def compile_count() -> int:
    """Graphs compiled in this process: Inductor compilations (AOTInductor's included) counted
    since glm5c.graphs.compile was imported or first compiled, plus Dynamo frames. Loading
    artifacts imports neither compiler (graphs/runner.py), so a start from valid artifacts leaves
    it at 0, and no compiler in sys.modules at all."""
    count = 0
    if "torch._inductor.compile_fx" in sys.modules:
        _count_inductor_compiles()
        count += _inductor_compiles
    if "torch._dynamo.utils" in sys.modules:
        from torch._dynamo.utils import counters

        count += counters["stats"].get("unique_graphs", 0)
    return count
