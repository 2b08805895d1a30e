"""The CPU's compiled MoE experts: dense batched GEMMs (every token through every expert) against
torch's grouped GEMM, eager, at the mini preset's shapes (16 experts, top-4, 512 -> 256), by
tokens per step. `ops.moe.experts_cpu` picks between them per bucket from this.

    python bench/cpu_experts.py [--tokens 1 2 4 8 16 32 64 128 256] [--out FILE]

Each: best of 20 after 3 warm-ups; both checked against the per-expert reference loop.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glm5c.bench.provenance import provenance
from glm5c.ops import linear_ref, moe


def best_ms(fn, *args, repeats: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    e, i, d, k = args.experts, args.intermediate, args.hidden, args.top_k
    weights = [(torch.randn(*shape, generator=g) * 0.05).bfloat16() for shape in ((e, i, d), (e, i, d), (e, d, i))]
    rows = []
    for t in args.tokens:
        x = torch.randn(t, d, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        w = torch.rand(t, k, generator=g)
        call = (x, ids, w, *weights, (None, None, None), 0, linear_ref)
        ref = moe.experts_ref(*call).float()
        row = {"tokens": t, "picked": "dense" if t * k <= moe.DENSE_MAX_ROWS_PER_EXPERT * e else "grouped"}
        for name, fn in (("grouped", moe.experts_grouped_mm), ("dense", moe.experts_dense)):
            row[f"{name}_ms"] = best_ms(fn, *call)
            row[f"{name}_max_err"] = (fn(*call).float() - ref).abs().max().item()
        row["dense_speedup"] = row["grouped_ms"] / row["dense_ms"]
        rows.append(row)
        print(f"{t:4d} tokens: grouped {row['grouped_ms']:.3f} ms, dense {row['dense_ms']:.3f} ms "
              f"(dense {row['dense_speedup']:.2f}x); experts_cpu picks {row['picked']}", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**provenance(), "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
