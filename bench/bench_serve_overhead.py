"""What the server's processes cost: the same workload through `glm5c serve` (RPC, tokenizer and
detokenizer processes) and through the in-process engine, in the same run.

    python bench/bench_serve_overhead.py [--model DIR] [--artifacts DIR] [--requests 32] [--input-len 32] [--output-len 32]

Throughput: N requests submitted at once, greedy, ignore_eos; generated tokens / wall time from
the first submission to the last final message (in-process: the whole LLM.generate call). The two
run alternately, --repeats rounds (this machine's speed drifts by 10-15% between runs); reported:
the best of each, and the median of the per-round ratios. Added latency: one short request (8 prompt tokens, 1 output token) at a time, --probes
times: end-to-end time at the client minus the in-process engine's time for the same request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


class InProcess:
    def __init__(self, model: str | None, artifacts: str | None = None) -> None:
        from glm5c import LLM

        self.llm = LLM(model, artifacts=artifacts)

    def throughput(self, workload: list[list[int]], output_len: int) -> tuple[int, float]:
        from glm5c import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        outs = self.llm.generate(workload, params)
        return sum(len(o.token_ids) for o in outs), time.perf_counter() - t

    def latencies(self, workload: list[list[int]], probes: int) -> list[float]:
        from glm5c import SamplingParams

        short, out = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), []
        for i in range(probes):
            t = time.perf_counter()
            self.llm.generate([workload[i % len(workload)][:8]], short)
            out.append(time.perf_counter() - t)
        return out


class OverRPC:
    def __init__(self, address: str) -> None:
        self.address = address

    async def _one(self, client, ids: list[int], max_tokens: int):
        return await client.complete(prompt_token_ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def throughput(self, workload: list[list[int]], output_len: int) -> tuple[int, float]:
        from glm5c.client import AsyncClient

        async def run():
            async with AsyncClient(self.address, timeout_s=600) as client:
                t = time.perf_counter()
                finals = await asyncio.gather(*(self._one(client, ids, output_len) for ids in workload))
                return sum(f.usage.completion_tokens for f in finals), time.perf_counter() - t

        return asyncio.run(run())

    def latencies(self, workload: list[list[int]], probes: int) -> list[float]:
        from glm5c.client import Client

        out = []
        with Client(self.address, timeout_s=600) as client:
            for i in range(probes):
                t = time.perf_counter()
                client.complete(prompt_token_ids=workload[i % len(workload)][:8], max_tokens=1, temperature=0.0)
                out.append(time.perf_counter() - t)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: the built-in mini model")
    parser.add_argument("--artifacts", help="both sides run these compiled graphs (default: the eager engine)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.artifacts and not Path(args.artifacts, "manifest.json").is_file():
        parser.error(f"--artifacts {args.artifacts}: no manifest.json there (run `glm5c compile` first)")

    from glm5c.default_model import default_model_dir
    from glm5c.serve.launcher import ServerProcess

    model = args.model or str(default_model_dir())
    workload = prompts(args.requests, args.input_len, args.seed, 1000)
    local = InProcess(model, args.artifacts)
    artifacts = ["--artifacts", args.artifacts] if args.artifacts else []
    with ServerProcess(["--model", model, *artifacts, "--port", "0"]) as server:
        rpc = OverRPC(server.address)
        for runner in (local, rpc):  # warm-up
            runner.throughput(workload[:2], args.output_len)
        rates: dict[str, list[float]] = {"local": [], "rpc": []}
        for _ in range(args.repeats):
            for name, runner in (("local", local), ("rpc", rpc)):
                tokens, wall_s = runner.throughput(workload, args.output_len)
                rates[name].append(tokens / wall_s)
        lat_local, lat_rpc = local.latencies(workload, args.probes), rpc.latencies(workload, args.probes)
    ratio = statistics.median(r / l for r, l in zip(rates["rpc"], rates["local"]))
    p50_local, p50_rpc = percentile(lat_local, 50), percentile(lat_rpc, 50)
    p99_local, p99_rpc = percentile(lat_local, 99), percentile(lat_rpc, 99)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": model, "artifacts": args.artifacts, "requests": args.requests, "input_len": args.input_len, "output_len": args.output_len,
        "repeats": args.repeats, "in_process_tok_per_s": rates["local"], "rpc_tok_per_s": rates["rpc"],
        "best_in_process_tok_per_s": max(rates["local"]), "best_rpc_tok_per_s": max(rates["rpc"]),
        "rpc_over_in_process_median_of_rounds": ratio,
        "rpc_over_in_process_best": max(rates["rpc"]) / max(rates["local"]),
        "short_request_in_process_ms": {"p50": p50_local * 1e3, "p99": p99_local * 1e3},
        "short_request_rpc_ms": {"p50": p50_rpc * 1e3, "p99": p99_rpc * 1e3},
        "added_latency_ms": {"p50": (p50_rpc - p50_local) * 1e3, "p99": (p99_rpc - p99_local) * 1e3},
        "short_request_mean_ms": {"in_process": statistics.mean(lat_local) * 1e3, "rpc": statistics.mean(lat_rpc) * 1e3},
    }  # fmt: skip
    print(f"throughput, {args.requests} requests x {args.output_len} tokens, best of {args.repeats}: in-process "
          f"{max(rates['local']):.1f} tok/s, over RPC {max(rates['rpc']):.1f} tok/s = "
          f"{result['rpc_over_in_process_best']:.1%}; median of per-round ratios {ratio:.1%}")  # fmt: skip
    print(f"one short request: in-process p50 {p50_local * 1e3:.2f} ms p99 {p99_local * 1e3:.2f} ms; "
          f"RPC p50 {p50_rpc * 1e3:.2f} ms p99 {p99_rpc * 1e3:.2f} ms; "
          f"added p50 {result['added_latency_ms']['p50']:.2f} ms p99 {result['added_latency_ms']['p99']:.2f} ms")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
