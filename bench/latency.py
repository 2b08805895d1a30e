"""`glm5c bench latency`: one batch, in-process, timed end to end — `vllm bench latency`'s flags
and JSON fields (avg_latency, latencies, percentiles), plus what they leave out: prefill time,
decode step latency per bucket, tokens/s, each decode step against the machine's roofline, and
the same batch through transformers' generate (`--baseline transformers`) or the uncompiled
engine (`--eager`) in the same run, iterations taken in turns, as ratios.

An iteration: BATCH requests of INPUT_LEN random prompt tokens join the engine at once; greedy,
OUTPUT_LEN tokens each (eos ignored). Prefill = until every request has its first token; the
steps after it are decode steps, grouped by the compiled bucket they ran in (eager: by tokens).
The engine runs without its prefix cache: iterations repeat the same prompts (until 2026-11-30
they did with it on, and prefills after the first were mostly served from the cache).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Callable

from .metrics import mean, percentile
from .progress import Progress

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: the built-in mini model)")
    parser.add_argument("--artifacts", help="time the compiled graphs from this `glm5c compile` directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--output-json", help="write the results here (vLLM's fields plus glm5c's)")
    parser.add_argument("--baseline", choices=["transformers"], help="also time transformers' generate")
    parser.add_argument("--eager", action="store_true", help="with --artifacts: also time the uncompiled engine")
    parser.add_argument("--speculative-tokens", type=int, default=0, help="MTP drafts per step (0: off)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def check(args: argparse.Namespace) -> None:
    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup must be >= 0, got {args.num_iters_warmup}")
    if args.eager and not args.artifacts:
        raise ValueError("--eager compares the compiled graphs against the eager engine: give --artifacts too")
    if args.artifacts and not Path(args.artifacts, "manifest.json").is_file():
        raise ValueError(f"--artifacts {args.artifacts}: no manifest.json there (run `glm5c compile` first)")


class _EngineRun:
    """Times iterations of one batch on one engine."""

    def __init__(self, llm, prompts: list[list[int]], output_len: int) -> None:
        from glm5c import SamplingParams

        self.llm, self.prompts = llm, prompts
        self.params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.k = llm.engine.drafter.k if llm.engine.drafter is not None else 0
        self._n = 0

    def iteration(self) -> dict:
        engine = self.llm.engine
        ids = [f"lat-{self._n}-{i}" for i in range(len(self.prompts))]
        self._n += 1
        start = time.perf_counter()
        for rid, prompt in zip(ids, self.prompts):
            engine.add_request(rid, prompt, self.params)
        started: set[str] = set()
        prefill_s, decode = None, []  # decode: (step seconds, tokens in the step)
        while engine.has_unfinished():
            t = time.perf_counter()
            outputs = engine.step()
            step_s = time.perf_counter() - t
            if prefill_s is None:
                started.update(o.request_id for o in outputs)
                if len(started) == len(ids):
                    prefill_s = time.perf_counter() - start
            elif outputs:
                decode.append((step_s, len(outputs) * (1 + self.k)))
        return {"latency_s": time.perf_counter() - start, "prefill_s": prefill_s, "decode": decode}


def _bucket_of(llm, tokens: int) -> str:
    return str(llm.runner.buckets.pick(tokens)) if llm.runner is not None else f"{tokens} tokens"


def _interleaved(runs: dict[str, Callable[[], dict]], warmup: int, iters: int) -> dict[str, list[dict]]:
    """Each run's iterations, taken in turns (A B C A B C ...) so that the machine's slow and fast
    phases (10-30% on the 2-core dev machine) fall on every run alike and their ratios hold."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    out: dict[str, list[dict]] = {name: [] for name in runs}
    with Progress(iters * len(runs), " + ".join(runs)) as progress:
        for _ in range(iters):
            for name, run in runs.items():
                out[name].append(run())
                progress.advance()
    return out


def _summary(latencies: list[float]) -> dict:
    return {"avg_latency": mean(latencies), "latencies": latencies,
            "percentiles": {str(q): percentile(latencies, q) for q in PERCENTILES}}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    check(args)
    from glm5c import LLM
    from glm5c.default_model import default_model_dir
    from glm5c.engine import EngineConfig

    from .roofline import matmul_peak_flops_per_s, read_bandwidth_bytes_per_s, roofline

    from .allocator import warm_allocator

    warm_allocator()  # the same allocator state for every run compared (bench/allocator.py)
    model_dir = args.model or str(default_model_dir())
    # every iteration repeats the same prompts: with the prefix cache on, all but the first would
    # find their prompts' full blocks cached and skip most of the prefill transformers recomputes
    config = EngineConfig(max_seqs=max(256, args.batch_size), num_speculative_tokens=args.speculative_tokens,
                          prefix_caching=False)  # fmt: skip
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, artifacts=args.artifacts, engine_config=config)
    if args.input_len + args.output_len > llm.engine.max_model_len:
        raise ValueError(f"--input-len {args.input_len} + --output-len {args.output_len} exceed the context "
                         f"of {llm.engine.max_model_len}")  # fmt: skip
    rng = random.Random(args.seed)
    vocab = llm.config.vocab_size
    prompts = [[rng.randrange(min(100, vocab - 1), vocab) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    mode = "compiled" if llm.runner is not None else "eager"
    runs: dict[str, Callable[[], dict]] = {mode: _EngineRun(llm, prompts, args.output_len).iteration}
    if args.eager:
        eager = LLM(model_dir, dtype=args.dtype, device=args.device, engine_config=config)
        runs["eager"] = _EngineRun(eager, prompts, args.output_len).iteration
    if args.baseline == "transformers":
        runs["transformers"] = _transformers_run(model_dir, llm.model.dtype, args, prompts)
    from glm5c.engine import freeze_startup_heap

    freeze_startup_heap()  # (no ~0.2 s full collection of the models' heap inside a timed run)
    # the machine's read bandwidth drifts (43-75 GB/s on the 2-core dev machine within an hour):
    # probe it on both sides of the timed runs and take the faster, the strictest floor
    bandwidth_probes = [read_bandwidth_bytes_per_s(args.device)]
    timed = _interleaved(runs, args.num_iters_warmup, args.num_iters)
    iters = timed[mode]
    latencies = [it["latency_s"] for it in iters]
    from .provenance import provenance

    result = {
        **_summary(latencies), **provenance(),
        "model": model_dir, "mode": mode, "device": args.device, "dtype": str(llm.model.dtype).removeprefix("torch."),
        "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "num_iters": args.num_iters, "speculative_tokens": args.speculative_tokens,
        "prefill_ms": {"mean": mean([it["prefill_s"] * 1e3 for it in iters]),
                       "median": percentile([it["prefill_s"] * 1e3 for it in iters], 50)},
        "output_tokens_per_s": args.batch_size * args.output_len / mean(latencies),
    }  # fmt: skip
    buckets: dict[str, list[float]] = {}
    for it in iters:
        for step_s, tokens in it["decode"]:
            buckets.setdefault(_bucket_of(llm, tokens), []).append(step_s * 1e3)
    result["decode_step_ms"] = {b: {"mean": mean(v), "median": percentile(v, 50), "p90": percentile(v, 90),
                                    "p99": percentile(v, 99), "steps": len(v)} for b, v in buckets.items()}  # fmt: skip
    all_steps = [s for it in iters for s, _ in it["decode"]]
    if all_steps:
        bandwidth_probes.append(read_bandwidth_bytes_per_s(args.device))
        bandwidth = max(bandwidth_probes)
        peak = matmul_peak_flops_per_s(args.device, llm.model.dtype)
        context = args.input_len + args.output_len // 2  # the average context over the decode
        # with MTP a step's forward verifies 1 + K tokens per request (its drafting is not counted)
        tokens = args.batch_size * (1 + args.speculative_tokens)
        result["roofline"] = {
            "read_bandwidth_GBps": bandwidth / 1e9, "matmul_peak_TFLOPs": peak / 1e12,
            "read_bandwidth_probes_GBps": [round(b / 1e9, 1) for b in bandwidth_probes],
            **roofline(llm.model, tokens, context, statistics.median(all_steps), bandwidth, peak),
        }  # fmt: skip
    if args.eager:
        eager_lat = [it["latency_s"] for it in timed["eager"]]
        result["eager"] = {**_summary(eager_lat), "speedup": mean(eager_lat) / mean(latencies)}
    if args.baseline == "transformers":
        base = [it["latency_s"] for it in timed["transformers"]]
        result["baseline"] = {"name": "transformers", **_summary(base), "speedup": mean(base) / mean(latencies)}
    if len(runs) > 1:
        result["interleaved"] = True  # iterations of every run taken in turns
    return result


def _transformers_run(model_dir: str, dtype, args: argparse.Namespace, prompts: list[list[int]]) -> Callable[[], dict]:
    import torch
    from transformers import GlmMoeDsaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = GlmMoeDsaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to(args.device)
    ids = torch.tensor(prompts, device=args.device)

    def one() -> dict:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        assert out.shape[1] == args.input_len + args.output_len
        return {"latency_s": time.perf_counter() - start}

    return one


def _probes(roofline: dict) -> str:
    probes = roofline.get("read_bandwidth_probes_GBps", [])
    return f" (best of probes {' / '.join(f'{p:.1f}' for p in probes)})" if len(probes) > 1 else ""


def report(result: dict) -> str:
    """The terminal table."""
    lines = [
        f"glm5c bench latency: {result['mode']} {result['dtype']} on {result['device']}, batch {result['batch_size']}, "
        f"input {result['input_len']}, output {result['output_len']}, {result['num_iters']} iterations",
        f"  end-to-end latency   avg {result['avg_latency'] * 1e3:9.1f} ms   "
        + "  ".join(f"p{q} {v * 1e3:.1f}" for q, v in result["percentiles"].items()),
        f"  prefill              avg {result['prefill_ms']['mean']:9.2f} ms",
        f"  output tokens/s          {result['output_tokens_per_s']:9.1f}",
    ]  # fmt: skip
    for bucket, s in sorted(result["decode_step_ms"].items(), key=lambda kv: int(kv[0].split()[0])):
        lines.append(f"  decode step [{bucket:>9s}] median {s['median']:8.2f} ms  p90 {s['p90']:.2f}  p99 {s['p99']:.2f}"
                     f"  ({s['steps']} steps)")  # fmt: skip
    if "roofline" in result:
        r = result["roofline"]
        what = (f"a verify forward ({r['batch']} tokens; drafting not counted)" if result["speculative_tokens"]
                else "a decode step")
        lines.append(f"  roofline: {what} moves {r['bytes'] / 1e6:.2f} MB and does {r['flops'] / 1e9:.3f} GFLOP; "
                     f"floor {max(r['memory_floor_ms'], r['compute_floor_ms']):.3f} ms ({r['bound']}-bound at "
                     f"{r['read_bandwidth_GBps']:.1f} GB/s{_probes(r)}, {r['matmul_peak_TFLOPs']:.2f} TFLOP/s) = "
                     f"{r['floor_over_step']:.1%} of the median step")  # fmt: skip
    if "eager" in result:
        lines.append(f"  eager engine: avg {result['eager']['avg_latency'] * 1e3:.1f} ms -> compiled is "
                     f"{result['eager']['speedup']:.2f}x faster")  # fmt: skip
    if "baseline" in result:
        lines.append(f"  transformers generate: avg {result['baseline']['avg_latency'] * 1e3:.1f} ms -> glm5c is "
                     f"{result['baseline']['speedup']:.2f}x faster")  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    result = run(args)
    print(report(result))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output_json}")
