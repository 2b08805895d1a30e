"""`glm5c bench serve`: drive a `glm5c serve` over its RPC like `vllm bench serve` drives an
OpenAI server — same flags, same metric names in the JSON — and draw the results.

Requests come from a dataset (`random`: prompt token ids of random lengths with a seed; `jsonl`:
one {"prompt": ...} or {"messages": [...]} per line, with an optional "max_tokens"), arrive at
`--request-rate` per second (a Poisson process, or gamma with `--burstiness`; `inf`: all at once)
with at most `--max-concurrency` in flight, and stream back. `--concurrency-sweep 1,4,16` runs
the benchmark once per concurrency. Every run reports TTFT, TPOT, ITL and E2EL (mean, median,
std, percentiles), request and token throughput, goodput under `--goodput` SLOs, tokens per
streamed chunk (with MTP: the acceptance length), and — when the model is known — the decode
step's roofline floor beside the measured TPOT. `--launch` starts the server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import time
from pathlib import Path

from .metrics import METRICS, SLO, RequestTimeline, summarize
from .progress import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("server")
    where.add_argument("--address", default="tcp://127.0.0.1:5555", help="the server to drive")
    where.add_argument("--launch", action="store_true", help="start `glm5c serve --port 0` for the run, then stop it")
    where.add_argument("--model", help="model directory (with --launch; also names the model for the roofline)")
    where.add_argument("--artifacts", help="with --launch: serve these compiled graphs")
    where.add_argument("--serve-args", default="", help='with --launch: more `glm5c serve` flags, as --serve-args="--max-seqs 64"')
    where.add_argument("--curve-keys", help="directory from `glm5c keys` for a CURVE server")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=["random", "jsonl"], default="random")
    data.add_argument("--dataset-path", help="the JSONL file for --dataset-name jsonl")
    data.add_argument("--num-prompts", type=int, default=100)
    data.add_argument("--random-input-len", type=int, default=32)
    data.add_argument("--random-output-len", type=int, default=32)
    data.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in L*(1 -/+ ratio)")
    data.add_argument("--seed", type=int, default=0)
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    load.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    load.add_argument("--concurrency-sweep", help="comma-separated concurrencies: one run each (e.g. 1,4,16)")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds without a reply before a request fails")
    out = parser.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    out.add_argument("--metric-percentiles", default="50,90,99")
    out.add_argument("--save-result", action="store_true", help="write the JSON (and the plots next to it)")
    out.add_argument("--result-dir", default=".")
    out.add_argument("--result-filename", help="default: glm5c-serve-<qps>qps-<concurrency>c-<date>.json")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--label", default="glm5c")


def check(args: argparse.Namespace) -> tuple[list[int | None], tuple[float, ...], SLO | None]:
    """-> the concurrencies to run, the percentiles, the SLOs. ValueError names a bad flag."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.random_input_len < 1 or args.random_output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    if args.dataset_name == "jsonl" and not (args.dataset_path and Path(args.dataset_path).is_file()):
        raise ValueError(f"--dataset-name jsonl needs --dataset-path FILE (got {args.dataset_path!r})")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.artifacts and not args.launch:
        raise ValueError("--artifacts is for --launch (a running server already chose its graphs)")
    unknown = set(args.percentile_metrics.split(",")) - set(METRICS)
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}; choose from {', '.join(METRICS)}")
    try:
        percentiles = tuple(float(q) for q in args.metric_percentiles.split(","))
    except ValueError:
        raise ValueError(f"--metric-percentiles must be numbers, got {args.metric_percentiles!r}") from None
    if any(not 0 < q < 100 for q in percentiles):
        raise ValueError("--metric-percentiles must lie in (0, 100)")
    concurrencies: list[int | None] = [args.max_concurrency]
    if args.concurrency_sweep:
        try:
            concurrencies = [int(c) for c in args.concurrency_sweep.split(",")]
        except ValueError:
            raise ValueError(f"--concurrency-sweep must be integers, got {args.concurrency_sweep!r}") from None
        if any(c < 1 for c in concurrencies):
            raise ValueError("--concurrency-sweep values must be >= 1")
    return concurrencies, percentiles, SLO.parse(args.goodput)


# ---- the dataset -----------------------------------------------------------------------------------
def dataset(args: argparse.Namespace, vocab_size: int) -> list[dict]:
    """-> request keyword arguments for the client: prompt_token_ids/prompt/messages + max_tokens."""
    rng = random.Random(args.seed)
    if args.dataset_name == "random":
        def length(n: int) -> int:
            lo, hi = max(1, int(n * (1 - args.random_range_ratio))), max(1, int(n * (1 + args.random_range_ratio)))
            return rng.randint(lo, hi)

        low = min(100, vocab_size - 1)
        return [{"prompt_token_ids": [rng.randrange(low, vocab_size) for _ in range(length(args.random_input_len))],
                 "max_tokens": length(args.random_output_len)} for _ in range(args.num_prompts)]  # fmt: skip
    items = []
    for number, line in enumerate(Path(args.dataset_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.dataset_path}:{number}: not JSON ({e})") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise ValueError(f"{args.dataset_path}:{number}: need an object with exactly one of prompt, messages")
        item = {k: row[k] for k in ("prompt", "messages") if k in row}
        item["max_tokens"] = int(row.get("max_tokens", row.get("output_len", args.random_output_len)))
        items.append(item)
    if not items:
        raise ValueError(f"{args.dataset_path} holds no prompts")
    return [items[i % len(items)] for i in range(args.num_prompts)]


def arrival_gaps_s(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps before each request: 0 at rate inf; else gamma(shape=burstiness, mean=1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


# ---- one run -----------------------------------------------------------------------------------------
async def _one(client, item: dict, args: argparse.Namespace, timeline: RequestTimeline) -> None:
    from glm5c.client import RequestError

    timeline.sent_s = time.perf_counter()
    try:
        stream = await client.generate(**item, temperature=args.temperature, ignore_eos=args.ignore_eos, stream=True)
        text = []
        async for delta in stream:
            if delta.token_ids:
                timeline.chunk_times_s.append(time.perf_counter())
                timeline.chunk_tokens.append(len(delta.token_ids))
            text.append(delta.text or delta.reasoning)
        timeline.end_s = time.perf_counter()
        timeline.text = "".join(text)
        timeline.prompt_tokens = stream.final.usage.prompt_tokens
    except (RequestError, TimeoutError, ValueError) as e:
        timeline.error = str(e)


async def benchmark(address: str, items: list[dict], args: argparse.Namespace, concurrency: int | None,
                    percentiles: tuple[float, ...], slo: SLO | None) -> tuple[dict, list[RequestTimeline]]:  # fmt: skip
    from glm5c.client import AsyncClient

    timelines = [RequestTimeline(0.0, len(item.get("prompt_token_ids", ()))) for item in items]
    gaps = arrival_gaps_s(len(items), args.request_rate, args.burstiness, args.seed)
    limit = asyncio.Semaphore(concurrency or len(items))
    async with AsyncClient(address, timeout_s=args.request_timeout, curve_keys=args.curve_keys) as client:
        with Progress(len(items), f"c={concurrency or 'max'}") as progress:

            async def limited(item, timeline):
                async with limit:
                    await _one(client, item, args, timeline)
                progress.advance()

            start = time.perf_counter()
            tasks = []
            for item, timeline, gap in zip(items, timelines, gaps):
                if gap:
                    await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(limited(item, timeline)))
            await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    result = summarize(timelines, duration, percentiles, slo)
    keep = set(args.percentile_metrics.split(","))
    result = {k: v for k, v in result.items()
              if not any(k.endswith(f"_{m}_ms") for m in METRICS if m not in keep)}  # fmt: skip
    done = [t for t in timelines if t.ok]
    result.update({
        "max_concurrency": concurrency, "request_rate": args.request_rate, "burstiness": args.burstiness,
        "num_prompts": len(items),
        "input_lens": [t.prompt_tokens for t in timelines], "output_lens": [t.output_tokens for t in timelines],
        "ttfts": [t.ttft_s for t in done], "itls": [t.itls_s for t in done],
        "e2els": [t.e2el_s for t in done],
        "generated_texts": [t.text for t in timelines], "errors": [t.error for t in timelines],
    })  # fmt: skip
    return result, timelines


# ---- the command ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[dict]:
    concurrencies, percentiles, slo = check(args)
    from glm5c.client import Client, RequestError

    server = None
    if args.launch:
        from glm5c.default_model import default_model_dir
        from glm5c.serve.launcher import ServerProcess

        args.model = args.model or str(default_model_dir())
        extra = ["--artifacts", args.artifacts] if args.artifacts else []
        server = ServerProcess(["--model", args.model, "--port", "0", *extra, *shlex.split(args.serve_args)])
        args.address = server.address
    try:
        try:
            with Client(args.address, timeout_s=5, curve_keys=args.curve_keys) as probe:
                stats = probe.stats()
                probe.timeout_s = args.request_timeout
                first = dataset(args, stats.vocab_size or 1000)[0]  # a warm-up request, as vLLM's bench sends
                probe.complete(**{**first, "max_tokens": min(2, first["max_tokens"])}, temperature=args.temperature)
        except (TimeoutError, RequestError) as e:
            raise ValueError(f"cannot reach a glm5c server at {args.address}: {e}") from None
        results = []
        for i, concurrency in enumerate(concurrencies):
            # each run its own prompts (seed + i), so no run hits the prefix cache of an earlier one
            items = dataset(argparse.Namespace(**{**vars(args), "seed": args.seed + i}), stats.vocab_size or 1000)
            result, _ = asyncio.run(benchmark(args.address, items, args, concurrency, percentiles, slo))
            result.update(_header(args, stats))
            if args.model:
                result["roofline"] = _tpot_floor(args.model, concurrency or len(items), result)
            results.append(result)
        return results
    finally:
        if server is not None:
            server.stop()


def _header(args: argparse.Namespace, stats) -> dict:
    from .provenance import provenance

    return {**provenance(), "backend": "glm5c", "label": args.label, "model_id": args.model or "(server's)",
            "tokenizer_id": args.model or "(server's)", "dataset_name": args.dataset_name,
            "max_model_len": stats.max_model_len}  # fmt: skip


def _tpot_floor(model_dir: str, batch: int, result: dict) -> dict:
    """The decode step's floor at this concurrency (this machine's bandwidth and matmul peak; the
    model built on the meta device, nothing loaded) beside the measured median TPOT."""
    import torch

    from glm5c.config import ModelConfig
    from glm5c.model import GLM5

    from .roofline import matmul_peak_flops_per_s, read_bandwidth_bytes_per_s, step_floor_bytes, step_flops

    config = ModelConfig.from_model_dir(model_dir)
    with torch.device("meta"):
        model = GLM5(config, dtype=getattr(torch, config.dtype))
    n = max(1, result["completed"])
    context = int(result["total_input_tokens"] / n + result["total_output_tokens"] / n / 2)
    bandwidth, peak = read_bandwidth_bytes_per_s(), matmul_peak_flops_per_s(dtype=model.dtype)
    floor_ms = max(step_floor_bytes(model, batch, context) / bandwidth, step_flops(model, batch, context) / peak) * 1e3
    tpot = result.get("median_tpot_ms", math.nan)
    return {"batch": batch, "context": context, "read_bandwidth_GBps": bandwidth / 1e9,
            "matmul_peak_TFLOPs": peak / 1e12, "decode_step_floor_ms": floor_ms,
            "floor_over_median_tpot": floor_ms / tpot if tpot and not math.isnan(tpot) else None}  # fmt: skip


def report(result: dict) -> str:
    """vLLM's terminal block."""
    rows = [("Successful requests", result["completed"]), ("Failed requests", result["failed"]),
            ("Maximum request concurrency", result["max_concurrency"]), ("Benchmark duration (s)", result["duration"]),
            ("Total input tokens", result["total_input_tokens"]), ("Total generated tokens", result["total_output_tokens"]),
            ("Request throughput (req/s)", result["request_throughput"])]  # fmt: skip
    if result["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", result["request_goodput"]))
    rows += [("Output token throughput (tok/s)", result["output_throughput"]),
             ("Total Token throughput (tok/s)", result["total_token_throughput"]),
             ("Tokens per streamed chunk", result["mean_tokens_per_chunk"])]  # fmt: skip
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k + ':':<40}{v:<10.2f}" if isinstance(v, float) else f"{k + ':':<40}{v!s:<10}" for k, v in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}  # fmt: skip
    for metric, title in titles.items():
        keys = [k for k in result if k.endswith(f"_{metric}_ms") and not k.startswith(("std", "p50_"))]
        if not keys:
            continue
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for k in keys:
            label = k.split("_")[0].capitalize() if not k.startswith("p") else k.split("_")[0].upper()
            lines.append(f"{f'{label} {metric.upper()} (ms):':<40}{result[k]:<10.2f}")
    if "roofline" in result:
        r = result["roofline"]
        lines.append(f"{'Decode step floor (ms):':<40}{r['decode_step_floor_ms']:<10.3f}")
        if r["floor_over_median_tpot"] is not None:
            lines.append(f"{'Floor / median TPOT:':<40}{r['floor_over_median_tpot']:<10.1%}")
    lines.append("=" * 50)
    return "\n".join(lines)


def _stem(args: argparse.Namespace, results: list[dict]) -> str:
    """Result files' name without extension: --result-filename's, or vLLM-like
    glm5c-serve-<qps>qps-<concurrency>c-<date> (`sweep` for a concurrency sweep, whose JSON
    files then end in -c<concurrency>)."""
    if args.result_filename:
        return args.result_filename.removesuffix(".json")
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    runs = "sweep" if len(results) > 1 else f"{results[0]['max_concurrency'] or 'max'}c"
    return f"glm5c-serve-{rate}qps-{runs}-{results[0]['date']}"


def main(args: argparse.Namespace) -> None:
    results = run(args)
    for result in results:
        print(report(result))
    if not args.save_result:
        return
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / _stem(args, results)
    for result in results:
        path = Path(f"{stem}-c{result['max_concurrency']}.json" if len(results) > 1 else f"{stem}.json")
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    if not args.no_plots:
        for png in plot(results, stem):
            print(f"wrote {png}")


def plot(results: list[dict], stem: Path) -> list[Path]:
    """Latency CDFs (TTFT, E2EL) per run; with a sweep, throughput and TPOT against concurrency."""
    from .plots import cdf_chart, line_chart

    name = lambda r: f"c={r['max_concurrency'] or 'max'}"  # noqa: E731
    written = []
    for metric, key in (("ttft", "ttfts"), ("e2el", "e2els")):
        path = Path(f"{stem}-{metric}-cdf.png")
        cdf_chart(path, [(name(r), [v * 1e3 for v in r[key]]) for r in results],
                  title=f"{metric.upper()} distribution", x_label=f"{metric.upper()} (ms)")  # fmt: skip
        written.append(path)
    if len(results) > 1:
        xs = [float(r["max_concurrency"]) for r in results]
        path = Path(f"{stem}-throughput.png")
        line_chart(path, [("output tok/s", xs, [r["output_throughput"] for r in results])],
                   title="Output throughput vs concurrency", x_label="concurrency", y_label="tok/s", x_log=True)  # fmt: skip
        written.append(path)
        path = Path(f"{stem}-tpot.png")
        line_chart(path, [("median TPOT", xs, [r.get("median_tpot_ms", math.nan) for r in results]),
                          ("p99 TPOT", xs, [r.get("p99_tpot_ms", math.nan) for r in results])],
                   title="TPOT vs concurrency", x_label="concurrency", y_label="ms", x_log=True)  # fmt: skip
        written.append(path)
    return written
