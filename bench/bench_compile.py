"""Ahead-of-time compilation: compile time per bucket, start-up with artifacts vs a cold compile,
and decode step latency compiled vs eager.

    python bench/bench_compile.py [--model DIR] [--buckets 1,2,4,8,16] [--max-model-len 1024] [--device cuda]

Cold compile = `glm5c compile` in a fresh process with an empty inductor cache. Ready = a fresh
process constructing `LLM(model, artifacts=DIR)` (imports, weights, graphs) until it could run a
step; it must compile nothing (the count is printed). Decode = the median time of the steps in
which all of a batch's requests decode together (--input-len-token prompts), engine step clock,
same process.
On a GPU (--device cuda, BF16) it also reports CUDA graph capture time and memory against the
compile-time estimate, and at batch 1 the graph replay time against the sum of its kernels' times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

_READY = r"""
import sys, time
t = time.perf_counter()
from glm5c import LLM
from glm5c.graphs.compile import compile_count
kw = {"device": sys.argv[3], "dtype": "bfloat16"} if len(sys.argv) > 3 else {}
llm = LLM(sys.argv[1], artifacts=sys.argv[2] if sys.argv[2] != "-" else None, **kw)
llm.generate([[100, 101, 102]], __import__("glm5c").SamplingParams(max_tokens=2, temperature=0))
print(time.perf_counter() - t, compile_count())
"""


def _fresh(args: list[str], env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
    return time.perf_counter() - t, out


def _decode_ms(llm, batch: int, n: int, input_len: int) -> float:
    """Median time of the steps in which all `batch` requests decode together (every prompt
    prefilled, none finished), from the engine's own step clock, after a warm-up generation. (Not
    the tail of a generate call: with buckets up to 16, 16 prompts prefill in turns and finish in
    turns, so its last steps hold fewer requests.)"""
    from glm5c import SamplingParams

    prompts = torch.randint(22, 1300, (batch, input_len), generator=torch.Generator().manual_seed(batch)).tolist()
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate(prompts, params)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"decode-{batch}-{i}", p, params)
    started: set[str] = set()
    while len(started) < batch:  # prefill, in as many steps as the buckets need
        started |= {o.request_id for o in engine.step()}
    times = []
    while True:
        outputs = engine.step()
        if len(outputs) < batch or any(o.finished for o in outputs):
            break
        times.append(engine.step_times_s[-1])
    while engine.has_unfinished():
        engine.step()
    if not times:
        raise ValueError(f"no step decoded all {batch} requests together: raise --new-tokens or lower --input-len")
    return statistics.median(times) * 1e3


def _gpu_graphs(llm, manifest) -> dict:
    """Capture time and memory of every bucket's graph, and the batch-1 replay against its kernels."""
    from torch.profiler import ProfilerActivity, profile

    from glm5c.batch import SeqChunk, build_step_batch

    runner = llm.runner
    cache = runner.new_cache(num_blocks=256)
    runner._graphs.clear()  # drop the graphs the engine captured at load, and their pool
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # reserved, not allocated: after capture the intermediates lie freed inside the graphs' private pool
    before = torch.cuda.memory_reserved()
    t = time.perf_counter()
    runner.capture(cache)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - t
    graph_bytes = torch.cuda.memory_reserved() - before
    batch = build_step_batch([SeqChunk([100], 5, [0])], runner.block_size, cache.pad_slot, "cuda",
                             max_blocks=runner.max_blocks)  # fmt: skip
    runner(batch, cache)
    graph, _ = runner._graphs[("step", 1)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_us = start.elapsed_time(end) / 200 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernel_us = sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA")
    # the graphs share one pool, captured largest first: they should need about the largest bucket's memory
    estimate = runner.graph_memory_bytes  # what the engine reserves for them when it sizes the KV cache
    return {"capture_s": capture_s, "graph_memory_bytes": graph_bytes, "graph_memory_estimate_bytes": estimate,
            "replay_us": replay_us, "kernel_sum_us": kernel_us, "replay_over_kernels": replay_us / max(kernel_us, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--buckets", default="1,2,4,8,16")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=8,
                        help="prompt tokens per request (short: with small buckets, prompts prefill in turns)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    for flag, least in (("input_len", 1), ("new_tokens", 2)):
        if getattr(args, flag) < least:
            parser.error(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch sizes must be >= 1, got {args.batch}")
    cuda = args.device.startswith("cuda")
    extra = ["--device", args.device, "--dtype", "bfloat16"] if cuda else []
    kw = {"device": args.device, "dtype": "bfloat16"} if cuda else {}
    torch.set_num_threads(2)
    from glm5c import LLM
    from glm5c.default_model import default_model_dir
    from glm5c.graphs.manifest import Manifest

    model = args.model or str(default_model_dir())
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = os.path.join(tmp, "artifacts")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))  # cold
        cold_s, _ = _fresh([sys.executable, "-m", "glm5c.cli", "compile", "--model", model, "--out", artifacts,
                            "--buckets", args.buckets, "--max-model-len", str(args.max_model_len), *extra], env)  # fmt: skip
        manifest = Manifest.read(artifacts)
        ready_s, out = _fresh([sys.executable, "-c", _READY, model, artifacts, *([args.device] if cuda else [])])
        ready_inner_s, compiles = out.split()
        eager_ready_s, _ = _fresh([sys.executable, "-c", _READY, model, "-", *([args.device] if cuda else [])])
        if cuda:
            from glm5c.graphs.compile import ops_for

            kw_eager = dict(kw, ops=ops_for("cuda", "bfloat16")[0])  # the same math, uncompiled
        else:
            kw_eager = kw
        eager, compiled = LLM(model, **kw_eager), LLM(model, artifacts=artifacts, **kw)
        gpu = _gpu_graphs(compiled, manifest) if cuda else None
        rows = []
        for batch in args.batch:
            e = _decode_ms(eager, batch, args.new_tokens, args.input_len)
            c = _decode_ms(compiled, batch, args.new_tokens, args.input_len)
            rows.append({"batch": batch, "eager_step_ms": e, "compiled_step_ms": c, "speedup": e / c})
    report = {
        "model": model,
        "buckets": [b.tokens for b in manifest.buckets],
        "compile_s_per_bucket": {b.tokens: b.compile_s for b in manifest.buckets},
        "mtp_compile_s_per_bucket": {b.tokens: b.compile_s for b in manifest.mtp_buckets},
        "cold_compile_process_s": cold_s,
        "ready_with_artifacts_process_s": ready_s,
        "ready_with_artifacts_in_process_s": float(ready_inner_s),
        "compilations_at_load": int(compiles),
        "ready_eager_process_s": eager_ready_s,
        "ready_over_cold": ready_s / cold_s,
        "decode": rows,
        "gpu_graphs": gpu,
        "torch": str(torch.__version__),
    }
    print(f"cold compile ({len(manifest.buckets)} buckets): {cold_s:.1f} s; per bucket "
          f"{report['compile_s_per_bucket']}, their MTP-layer graphs {report['mtp_compile_s_per_bucket']}")  # fmt: skip
    print(f"ready with artifacts: {ready_s:.2f} s ({ready_s / cold_s:.1%} of the cold compile; target <= 10%), "
          f"{compiles} compilations; eager start {eager_ready_s:.2f} s")  # fmt: skip
    for r in rows:
        print(f"decode batch {r['batch']:3d}: eager {r['eager_step_ms']:.2f} ms/step, compiled "
              f"{r['compiled_step_ms']:.2f} ms/step -> {r['speedup']:.2f}x")  # fmt: skip
    if gpu:
        print(f"CUDA graphs: capture {gpu['capture_s']:.2f} s, memory {gpu['graph_memory_bytes'] / 2**20:.1f} MiB "
              f"(estimate {gpu['graph_memory_estimate_bytes'] / 2**20:.1f} MiB); batch-1 replay "
              f"{gpu['replay_us']:.1f} us vs kernels {gpu['kernel_sum_us']:.1f} us -> {gpu['replay_over_kernels']:.3f}x "
              f"(target <= 1.15x)")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
