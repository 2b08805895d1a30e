"""Ahead-of-time compilation: compile time per bucket, start-up with artifacts vs a cold compile,
and decode step latency compiled vs eager.

    python bench/bench_compile.py [--model DIR] [--buckets 1,2,4,8,16] [--max-model-len 1024]

Cold compile = `glm5c compile` in a fresh process with an empty inductor cache. Ready = a fresh
process constructing `LLM(model, artifacts=DIR)` (imports, weights, graphs) until it could run a
step; it must compile nothing (the count is printed). Decode = per-step time of greedy
generation, (time for N new tokens - time for 1) / (N - 1), best of 3, same process.
"""

from __future__ import annotations

import argparse
import json
import os
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
llm = LLM(sys.argv[1], artifacts=sys.argv[2] if len(sys.argv) > 2 else None)
llm.generate([[100, 101, 102]], __import__("glm5c").SamplingParams(max_tokens=2, temperature=0))
print(time.perf_counter() - t, compile_count())
"""


def _fresh(args: list[str], env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
    return time.perf_counter() - t, out


def _decode_ms(llm, batch: int, n: int) -> float:
    from glm5c import SamplingParams

    prompts = torch.randint(22, 1300, (batch, 32), generator=torch.Generator().manual_seed(batch)).tolist()

    def run(k: int) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))
            best = min(best, time.perf_counter() - t)
        return best

    run(2)
    return (run(n) - run(1)) / (n - 1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--buckets", default="1,2,4,8,16")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from glm5c import LLM
    from glm5c.default_model import default_model_dir
    from glm5c.graphs.manifest import Manifest

    model = args.model or str(default_model_dir())
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = os.path.join(tmp, "artifacts")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))  # cold
        cold_s, _ = _fresh([sys.executable, "-m", "glm5c.cli", "compile", "--model", model, "--out", artifacts,
                            "--buckets", args.buckets, "--max-model-len", str(args.max_model_len)], env)  # fmt: skip
        manifest = Manifest.read(artifacts)
        ready_s, out = _fresh([sys.executable, "-c", _READY, model, artifacts])
        ready_inner_s, compiles = out.split()
        eager_ready_s, _ = _fresh([sys.executable, "-c", _READY, model])
        eager, compiled = LLM(model), LLM(model, artifacts=artifacts)
        rows = []
        for batch in args.batch:
            e, c = _decode_ms(eager, batch, args.new_tokens), _decode_ms(compiled, batch, args.new_tokens)
            rows.append({"batch": batch, "eager_step_ms": e, "compiled_step_ms": c, "speedup": e / c})
    report = {
        "model": model,
        "buckets": [b.tokens for b in manifest.buckets],
        "compile_s_per_bucket": {b.tokens: b.compile_s for b in manifest.buckets},
        "cold_compile_process_s": cold_s,
        "ready_with_artifacts_process_s": ready_s,
        "ready_with_artifacts_in_process_s": float(ready_inner_s),
        "compilations_at_load": int(compiles),
        "ready_eager_process_s": eager_ready_s,
        "ready_over_cold": ready_s / cold_s,
        "decode": rows,
        "torch": str(torch.__version__),
    }
    print(f"cold compile ({len(manifest.buckets)} buckets): {cold_s:.1f} s; per bucket "
          f"{report['compile_s_per_bucket']}")  # fmt: skip
    print(f"ready with artifacts: {ready_s:.2f} s ({ready_s / cold_s:.1%} of the cold compile; target <= 10%), "
          f"{compiles} compilations; eager start {eager_ready_s:.2f} s")  # fmt: skip
    for r in rows:
        print(f"decode batch {r['batch']:3d}: eager {r['eager_step_ms']:.2f} ms/step, compiled "
              f"{r['compiled_step_ms']:.2f} ms/step -> {r['speedup']:.2f}x")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
