"""Decode steps of two or more artifact directories, compared in one process: one engine each,
their runs interleaved round by round (order alternating), so that both see the same machine. On
the 2-core dev machine, separate processes run the same graphs up to ~10% apart, depending on
where the VM places them (bench/results/2026-11-30-cpu-session7.md); this is the comparison to
trust for changes of a few percent (a compile option, a kernel that ships inside the graphs).

    python bench/ab_artifacts.py DIR_A DIR_B [--batch 16] [--rounds 10] [--new-tokens 64] [--out FILE]

Each round: `batch` requests of 32 random prompt tokens, greedy, `new-tokens` each; the decode
steps after the prompt are timed (Engine.step_times_s). Reported per directory: the median of the
rounds' median steps, the prefill step's median, and each directory's ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", help="artifact directories (`glm5c compile --out`), two or more")
    parser.add_argument("--model", help="checkpoint directory (default: the built-in mini model)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    if len(args.artifacts) < 2:
        parser.error("give two or more artifact directories")
    if min(args.batch, args.rounds, args.new_tokens - 1) < 1:
        parser.error("--batch and --rounds must be >= 1, --new-tokens >= 2")

    from glm5c import LLM, SamplingParams
    from glm5c.default_model import default_model_dir
    from glm5c.engine import EngineConfig

    from glm5c.bench.allocator import warm_allocator

    warm_allocator()
    model_dir = args.model or str(default_model_dir())
    config = EngineConfig(max_seqs=max(256, args.batch), prefix_caching=False)  # every round repeats its prompts
    try:
        llms = [LLM(model_dir, artifacts=a, engine_config=config) for a in args.artifacts]
    except (ValueError, OSError) as e:  # a directory that is not artifacts (for this model), a bad checkpoint
        parser.exit(2, f"ab_artifacts.py: error: {e}\n")
    vocab = llms[0].config.vocab_size
    prompts = torch.randint(min(100, vocab - 1), vocab, (args.batch, 32), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def one_round(llm) -> tuple[float, float]:
        engine = llm.engine
        llm.generate(prompts.tolist(), params)
        steps = engine.step_times_s[-llm.last_stats["steps"] :]
        decode = steps[-(args.new_tokens - 1) :]  # the steps after every prompt is in
        return statistics.median(decode), steps[0]

    for llm in llms:  # warm up (first calls, allocator, caches)
        one_round(llm)
    results: list[list[tuple[float, float]]] = [[] for _ in llms]  # per directory (the same one may repeat)
    for r in range(args.rounds):
        order = list(range(len(llms)))
        for i in order if r % 2 == 0 else reversed(order):
            results[i].append(one_round(llms[i]))
    first = statistics.median(s for s, _ in results[0])
    report = {"batch": args.batch, "rounds": args.rounds, "new_tokens": args.new_tokens, "runs": []}
    for a, rounds in zip(args.artifacts, results):
        step = statistics.median(s for s, _ in rounds)
        prefill = statistics.median(p for _, p in rounds)
        report["runs"].append({"artifacts": a, "decode_step_ms": step * 1e3, "prefill_step_ms": prefill * 1e3,
                               "vs_first": step / first, "round_steps_ms": [s * 1e3 for s, _ in rounds]})  # fmt: skip
        print(f"{a}: decode step {step * 1e3:.3f} ms (x{step / first:.3f} the first), first step {prefill * 1e3:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
