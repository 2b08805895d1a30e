"""The runtime on the mini model: output tokens/s for concurrent requests against transformers'
generate (same checkpoint, same run), decode steps against their memory-bandwidth floor, the
engine's own overhead per step, and MTP speculative decoding.

    python bench/bench_engine.py [--model DIR] [--artifacts DIR] [--concurrency 1 16] [--new-tokens 64]

Throughput = generated tokens / wall time of the whole generate call (prefill included), greedy,
prompts of 32 random tokens, best of --repeats. The floor of a decode step is the bytes it must
read (every weight of the model except the routed experts no token picked, plus the KV entries
attention reads) over this machine's measured read bandwidth. Overhead = step time - forward time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from glm5c.bench.roofline import read_bandwidth_bytes_per_s, step_floor_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--artifacts", help="also measure the compiled graphs from this `glm5c compile` dir")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mtp", type=int, default=3, help="MTP drafts per step for the speculative run (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from glm5c.bench.allocator import warm_allocator

    warm_allocator()  # the same allocator state for every run compared (bench/allocator.py)
    from transformers import GlmMoeDsaForCausalLM
    from transformers.utils import logging

    from glm5c import LLM, SamplingParams
    from glm5c.default_model import default_model_dir
    from glm5c.engine import EngineConfig
    from glm5c.mtp import DraftStats

    logging.set_verbosity_error()
    model_dir = args.model or str(default_model_dir())
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    # repeats run the same prompts: without the prefix cache, so every prefill is computed (as
    # transformers computes it) rather than found cached from the repeat before
    uncached = EngineConfig(prefix_caching=False)
    variants = {"eager": LLM(model_dir, engine_config=uncached)}
    if args.artifacts:
        variants["compiled"] = LLM(model_dir, artifacts=args.artifacts, engine_config=uncached)
    hf = GlmMoeDsaForCausalLM.from_pretrained(model_dir, dtype=variants["eager"].model.dtype).eval()
    from glm5c.engine import freeze_startup_heap

    freeze_startup_heap()  # (no ~0.2 s full collection of the models' heap inside a timed run)
    # the machine's read rate drifts (the 2-core dev machine's probe reads ~45 or ~72 GB/s, for
    # minutes at a time): probe it on both sides of each row's runs and floor the row on the faster
    # of the two, the strictest floor (as `glm5c bench latency` does)
    probes = [read_bandwidth_bytes_per_s()]
    report: dict = {"model": model_dir, "read_bandwidth_probes_GBps": [], "rows": []}

    for n in args.concurrency:
        prompts = torch.randint(22, 1300, (n, 32), generator=torch.Generator().manual_seed(n))

        def hf_run() -> None:
            with torch.inference_mode():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip

        hf_s = _best(hf_run, args.repeats)
        row = {"concurrency": n, "transformers_tok_s": n * args.new_tokens / hf_s}
        timed = {}
        for name, llm in variants.items():
            s = _best(lambda: llm.generate(prompts.tolist(), params), args.repeats)
            decode = slice(-(args.new_tokens - 1), None)  # the last generate's decode-only steps
            timed[name] = (s, statistics.median(llm.engine.step_times_s[decode]),
                           statistics.median(llm.engine.forward_times_s[decode]))  # fmt: skip
        probes.append(read_bandwidth_bytes_per_s())
        bandwidth = max(probes[-2:])
        row["read_bandwidth_GBps"] = bandwidth / 1e9
        print(f"read bandwidth {probes[-2] / 1e9:.1f} / {probes[-1] / 1e9:.1f} GB/s before / after the runs")
        for name, llm in variants.items():
            s, step_s, forward_s = timed[name]
            floor_s = step_floor_bytes(llm.model, n, 32 + args.new_tokens // 2) / bandwidth
            row[name] = {
                "tok_s": n * args.new_tokens / s,
                "vs_transformers": hf_s / s,
                "decode_step_ms": step_s * 1e3,
                "step_over_floor": step_s / floor_s,
                "floor_ms": floor_s * 1e3,
                "overhead_us": (step_s - forward_s) * 1e6,
                "overhead_frac": (step_s - forward_s) / step_s,
            }
            r = row[name]
            print(f"{n:3d} requests, {name:8s}: {r['tok_s']:7.1f} tok/s = {r['vs_transformers']:.2f}x transformers "
                  f"({row['transformers_tok_s']:.1f}); decode step {r['decode_step_ms']:.2f} ms = "
                  f"{r['step_over_floor']:.2f}x its floor ({r['floor_ms']:.2f} ms); engine overhead "
                  f"{r['overhead_us']:.0f} us/step ({r['overhead_frac']:.1%})", flush=True)  # fmt: skip
        report["rows"].append(row)

    if args.mtp:
        report["mtp"] = {}
        prompts = torch.randint(22, 1300, (4, 32), generator=torch.Generator().manual_seed(99)).tolist()
        for name, plain in variants.items():
            spec = LLM(model_dir, artifacts=args.artifacts if name == "compiled" else None,
                       engine_config=EngineConfig(num_speculative_tokens=args.mtp, prefix_caching=False))  # fmt: skip
            plain_s = _best(lambda: plain.generate(prompts, params), 1)
            plain_steps = plain.last_stats["steps"]
            spec_s = _best(lambda: spec.generate(prompts, params), 1)
            stats, engine = spec.engine.drafter.stats, spec.engine
            steps = spec.last_stats["steps"]
            decode = slice(-(steps - 1), None)  # the last generate's steps after the prefill
            m = {
                "k": args.mtp, "acceptance_rate": stats.acceptance_rate, "mean_accept_length": stats.mean_accept_length,
                "steps_plain": plain_steps, "steps_mtp": steps, "speedup": plain_s / spec_s,
                "plain_step_ms": statistics.median(plain.engine.step_times_s[-(plain_steps - 1):]) * 1e3,
                "plain_forward_ms": statistics.median(plain.engine.forward_times_s[-(plain_steps - 1):]) * 1e3,
                "mtp_step_ms": statistics.median(engine.step_times_s[decode]) * 1e3,
                "verify_forward_ms": statistics.median(engine.forward_times_s[decode]) * 1e3,
                "draft_ms": statistics.median(engine.draft_times_s[decode]) * 1e3,
            }  # fmt: skip
            # tokens a speculative step must emit per request to break even with plain decoding
            m["break_even_accept_length"] = m["mtp_step_ms"] / m["plain_step_ms"]
            # the ceiling: drafts that are always right, standing in for a well-trained MTP layer (the
            # layer still runs, so the drafting cost is real). "Right" = what this engine's verify steps
            # pick: in BF16 a 16-token verify graph and a 4-token decode graph round differently, and
            # near-ties on random weights make their greedy tokens part ways. So the truth starts
            # from the plain run and is replaced by the speculative run's own output until it stays.
            truth = {tuple(p): p + o.token_ids for p, o in zip(prompts, plain.generate(prompts, params))}
            oracle = LLM(model_dir, artifacts=args.artifacts if name == "compiled" else None,
                         engine_config=EngineConfig(num_speculative_tokens=args.mtp, prefix_caching=False))  # fmt: skip
            _draft_the_truth(oracle.engine.drafter, truth)
            for _ in range(4):
                seen = {tuple(p): p + o.token_ids for p, o in zip(prompts, oracle.generate(prompts, params))}
                if seen == truth:
                    break
                truth.update(seen)
            oracle.engine.drafter.stats = DraftStats()
            oracle_s = _best(lambda: oracle.generate(prompts, params), 1)
            m["oracle_mean_accept_length"] = oracle.engine.drafter.stats.mean_accept_length
            m["oracle_speedup"] = plain_s / oracle_s
            report["mtp"][name] = m
            print(f"MTP k={args.mtp}, {name:8s} (4 requests): acceptance {m['acceptance_rate']:.1%}, mean accept "
                  f"length {m['mean_accept_length']:.2f}, steps {m['steps_mtp']} vs {m['steps_plain']}, speed-up "
                  f"{m['speedup']:.2f}x; step {m['mtp_step_ms']:.2f} ms (verify forward {m['verify_forward_ms']:.2f}, "
                  f"catch-up + drafts {m['draft_ms']:.2f}) vs plain {m['plain_step_ms']:.2f} ms (forward "
                  f"{m['plain_forward_ms']:.2f}): breaks even at accept length {m['break_even_accept_length']:.2f}; "
                  f"with always-right drafts: accept length {m['oracle_mean_accept_length']:.2f}, speed-up "
                  f"{m['oracle_speedup']:.2f}x", flush=True)  # fmt: skip
    report["read_bandwidth_probes_GBps"] = [round(b / 1e9, 1) for b in probes]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


def _draft_the_truth(drafter, truth: dict[tuple[int, ...], list[int]]) -> None:
    """Replace each draft the MTP layer makes with the next tokens of `truth` (prompt -> prompt +
    the plain run's output), after the layer ran and wrote its cache."""
    real = drafter.catch_up_and_draft

    def drafts(entries) -> None:
        real(entries)
        for e in entries:
            if e.seq.draft:
                full, n = truth[tuple(e.seq.tokens[: e.seq.prompt_len])], len(e.seq.tokens)
                e.seq.draft = (full[n : n + drafter.k] + [0] * drafter.k)[: drafter.k]

    drafter.catch_up_and_draft = drafts


def _best(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    main()
