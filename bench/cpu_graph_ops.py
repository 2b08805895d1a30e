"""Which ops a CPU's BF16 graphs should hold, bucket by bucket: whole decode-step graphs compiled
with the chosen ops (graphs.compile.ops_for("cpu", "bfloat16")) and with one op swapped for an
alternative, timed alternately in one process (this machine's speed drifts 10-30% over minutes).

    python bench/cpu_graph_ops.py [--model DIR] [--buckets 1 4 8 16] [--variants ...] [--rounds 5] [--out FILE]

A step: every row of the bucket decodes one token of its own sequence at position --context - 1,
block tables as wide as that context (as the engine builds them; the runner widens them to the
graph's minimum); the cache holds random entries (the time does not depend on them). Per round and variant, the
median of --steps runner calls; reported: the median over rounds, and its ratio to `chosen`.
Compiling takes ~25 s per bucket and variant on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glm5c.batch import SeqChunk, build_step_batch
from glm5c.bench.provenance import provenance
from glm5c.graphs.buckets import Buckets
from glm5c.graphs.compile import compile_artifacts, ops_for
from glm5c.graphs.runner import GraphRunner
from glm5c.ops import cpu_linear, dsa, dsa_cpu, gemv, linear_ref, moe, moe_cpu
from glm5c.weights import build_model


def _gemv_linear(x, weight, scale_inv=None):
    return gemv(x, weight) if scale_inv is None else linear_ref(x, weight, scale_inv)


def _gemv_then_gemm(x, weight, scale_inv=None):
    """gemv up to 4 rows, then torch's GEMM (what CPU graphs held before the kernel)."""
    rows = x.numel() // ((weight.shape[0] if weight.dim() == 3 else 1) * x.shape[-1])
    if scale_inv is None and rows <= 4:
        return gemv(x, weight)
    return linear_ref(x, weight, scale_inv)


def _gemv_then_kernel(x, weight, scale_inv=None):
    """gemv up to 4 rows, then linear_cpu (the choice before the kernel's register tiles)."""
    rows = x.numel() // ((weight.shape[0] if weight.dim() == 3 else 1) * x.shape[-1])
    if scale_inv is None and rows <= 4:
        return gemv(x, weight)
    return cpu_linear.linear_cpu(x, weight, scale_inv)


def _attention_gemv_then_kernel(q, kv_cache, indices, block_tables, seq_ids, softmax_scale, v_dim):
    """sparse_mla_gemv up to 4 tokens, then the kernel (the choice before its register tiles)."""
    fn = dsa.sparse_mla_gemv if q.shape[0] <= 4 else dsa_cpu.sparse_mla
    return fn(q, kv_cache, indices, block_tables, seq_ids, softmax_scale, v_dim)


def _experts_kernel_op(x, expert_ids, expert_weights, gate, up, down, scales, first_expert, linear):
    """The experts kernel's op in every bucket (moe_cpu.experts keeps Inductor's gathered loops for 1 token)."""
    return torch.ops.glm5c.moe_experts_cpu(x, expert_ids, expert_weights.float(), gate, up, down, first_expert)


# an op -> the Ops field that lays out its weights at load (the alternatives take them as loaded)
LAYOUTS = {"experts": "pack_experts", "linear": "pack_linear"}

# name -> (Ops field, replacement): each variant swaps one op of the chosen set in every bucket
VARIANTS = {
    "chosen": None,
    "experts: dense": ("experts", moe.experts_dense),
    "experts: gathered": ("experts", moe.experts_gathered),
    "experts: kernel op": ("experts", _experts_kernel_op),
    "experts: kernel, unblocked stacks": ("experts", moe_cpu.experts),
    "experts: grouped": ("experts", moe.experts_grouped_mm),
    "linears: GEMM": ("linear", linear_ref),
    "linears: gemv": ("linear", _gemv_linear),
    "linears: gemv, then GEMM": ("linear", _gemv_then_gemm),
    "linears: gemv to 4 rows, then kernel": ("linear", _gemv_then_kernel),
    "linears: kernel, unblocked weights": ("linear", cpu_linear.linear_cpu),
    "attention: BF16 matmuls": ("sparse_mla", dsa.sparse_mla_lowp),  # (beyond 4 tokens, the kernel before)
    "attention: fused gemv": ("sparse_mla", dsa.sparse_mla_gemv),
    "attention: gemv to 4 tokens, then kernel": ("sparse_mla", _attention_gemv_then_kernel),
    "indexer: reference": ("indexer_topk", dsa.indexer_topk_ref),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the built-in mini model)")
    parser.add_argument("--buckets", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    for name in ("rounds", "steps", "context"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.buckets):
        parser.error(f"--buckets must be >= 1, got {args.buckets}")
    if args.model is not None and not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there")
    if args.model is None:
        from glm5c.default_model import default_model_dir

        args.model = str(default_model_dir())
    chosen_ops, chosen_names = ops_for("cpu", "bfloat16")
    block_size, max_len = 16, 1024
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}  # by which weights are blocked (Ops.pack_experts, pack_linear): the model the graphs were built for
        for name in args.variants:
            swap = VARIANTS[name]
            ops, names = chosen_ops, chosen_names
            if swap is not None:  # the other forms of an op take weights as loaded ([out, in], [E, out, in])
                field, fn = swap
                as_loaded = {LAYOUTS[field]: None} if field in LAYOUTS else {}
                ops = dataclasses.replace(chosen_ops, **{field: fn}, **as_loaded)
                names = {**chosen_names, field: f"{fn.__name__} ({name})"}
            blocked = (ops.pack_experts is not None, ops.pack_linear is not None)
            if blocked not in models:
                models[blocked] = build_model(args.model, dtype=torch.bfloat16, ops=ops)
            out = Path(tmp) / f"v{len(runners)}"
            t = time.perf_counter()
            compile_artifacts(args.model, out, Buckets(tuple(args.buckets)), dtype="bfloat16", block_size=block_size,
                              max_model_len=max_len, progress=lambda _: None, op_set=(ops, names))  # fmt: skip
            print(f"compiled {name!r} in {time.perf_counter() - t:.0f} s", flush=True)
            runners[name] = GraphRunner(out, models[blocked], args.model)
        times: dict[tuple[int, str], list[float]] = {}
        blocks_per_seq = -(-args.context // block_size)
        for bucket in args.buckets:
            cache = runners[args.variants[0]].new_cache(num_blocks=bucket * blocks_per_seq + 1)
            for t in (cache.latent, cache.index_k):
                for layer in t:
                    if layer is not None:
                        layer.copy_(torch.randn(layer.shape).to(layer.dtype))
            chunks = [SeqChunk([7], args.context - 1, list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)))
                      for s in range(bucket)]  # fmt: skip
            batch = build_step_batch(chunks, block_size, cache.pad_slot)  # tables as wide as the context, as the engine's
            for _ in range(args.rounds):
                for name, runner in runners.items():
                    with torch.inference_mode():
                        for _ in range(3):
                            runner(batch, cache)
                        steps = []
                        for _ in range(args.steps):
                            t = time.perf_counter()
                            runner(batch, cache)
                            steps.append(time.perf_counter() - t)
                    times.setdefault((bucket, name), []).append(statistics.median(steps) * 1e3)
    rows = []
    print(f"\n| bucket | {' | '.join(args.variants)} |\n|---|{'---|' * len(args.variants)}")
    for bucket in args.buckets:
        base = statistics.median(times[(bucket, args.variants[0])])
        cells = []
        for name in args.variants:
            ms = statistics.median(times[(bucket, name)])
            rows.append({"bucket": bucket, "variant": name, "step_ms": round(ms, 3), "rounds_ms": times[(bucket, name)]})
            cells.append(f"{ms:.2f} ms ({ms / base:.2f}x)")
        print(f"| {bucket} | {' | '.join(cells)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"provenance": provenance(), "args": vars(args), "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
