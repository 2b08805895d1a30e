"""MoE experts on a CPU, eager, at the mini preset's shapes (16 experts, top-4, 512 -> 256), by
tokens per step: the C++ kernel of a CPU's BF16 graphs (ops/moe_cpu.py) on blocked stacks
("blocked": moe_cpu.pack_experts, what graphs run where the kernel has AVX512-BF16) and on
[E, out, in] stacks ("kernel"), against the torch forms it replaced, dense batched GEMMs (every
token through every expert) and torch's grouped GEMM.

    python bench/cpu_experts.py [--tokens 1 2 4 8 16 32 64 128 256] [--out FILE]

Each: best of 20 after 3 warm-ups, all checked against the per-expert reference loop. Run twice
per form: with one layer's weights (hot: they fit this CPU's L3) and cycling through --layers
copies of them (cold: from memory, as in a decode step), where the kernel's read rate is also
reported (bytes of the experts the tokens chose over the time).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glm5c.bench.provenance import provenance
from glm5c.ops import cpu_kernels, linear_ref, moe, moe_cpu


def best_ms(fn, *args, repeats: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def kernel(x, ids, w, gate, up, down, scales, first, linear):
    return moe_cpu.experts_bf16(x, ids, w, gate, up, down, first)


def blocked(x, ids, w, gate, up, down, scales, first, linear):
    return moe_cpu.experts_packed_bf16(x, ids, w, gate, up, down, first)


FORMS = (("kernel", kernel), ("dense", moe.experts_dense), ("grouped", moe.experts_grouped_mm))  # on [E, out, in]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10, help="weight copies cycled through for the cold runs")
    parser.add_argument("--out")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    e, i, d, k = args.experts, args.intermediate, args.hidden, args.top_k
    layers = [[(torch.randn(*shape, generator=g) * 0.05).bfloat16() for shape in ((e, i, d), (e, i, d), (e, d, i))]
              for _ in range(args.layers)]  # fmt: skip
    forms = [(name, fn, layers) for name, fn in FORMS]
    if cpu_kernels.has_avx512_bf16():
        forms.insert(0, ("blocked", blocked, [moe_cpu.pack_experts(*weights) for weights in layers]))
    print(f"kernel: {'AVX512-BF16' if cpu_kernels.has_avx512_bf16() else 'portable fp32 FMA'} dot products, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    rows = []
    for t in args.tokens:
        x = torch.randn(t, d, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        w = torch.rand(t, k, generator=g)
        ref = moe.experts_ref(x, ids, w, *layers[0], (None, None, None), 0, linear_ref).float()
        row = {"tokens": t}
        for name, fn, stacks in forms:
            def cold(fn=fn, stacks=stacks):
                for weights in stacks:
                    fn(x, ids, w, *weights, (None, None, None), 0, linear_ref)

            row[f"{name}_hot_ms"] = best_ms(fn, x, ids, w, *stacks[0], (None, None, None), 0, linear_ref)
            row[f"{name}_cold_ms"] = best_ms(cold, repeats=5) / len(stacks)
            got = fn(x, ids, w, *stacks[0], (None, None, None), 0, linear_ref).float()
            row[f"{name}_max_err"] = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-9)
        chosen_bytes = ids.unique().numel() * 3 * i * d * 2
        row["kernel_cold_GBps"] = chosen_bytes / row["kernel_cold_ms"] / 1e6
        for name in ("dense", "grouped"):
            row[f"kernel_vs_{name}_cold"] = row[f"{name}_cold_ms"] / row["kernel_cold_ms"]
        blocked_note = ""
        if "blocked_cold_ms" in row:
            row["blocked_cold_GBps"] = chosen_bytes / row["blocked_cold_ms"] / 1e6
            row["blocked_vs_kernel_cold"] = row["kernel_cold_ms"] / row["blocked_cold_ms"]
            row["blocked_vs_kernel_hot"] = row["kernel_hot_ms"] / row["blocked_hot_ms"]
            blocked_note = (f"blocked {row['blocked_cold_ms']:.3f} ({row['blocked_hot_ms']:.3f}) ms "
                            f"[{row['blocked_cold_GBps']:.0f} GB/s, {row['blocked_vs_kernel_cold']:.2f}x "
                            f"({row['blocked_vs_kernel_hot']:.2f}x) the kernel on [E, out, in]], ")  # fmt: skip
        rows.append(row)
        print(f"{t:4d} tokens, cold (hot): {blocked_note}kernel {row['kernel_cold_ms']:.3f} ({row['kernel_hot_ms']:.3f}) ms "
              f"[{row['kernel_cold_GBps']:.0f} GB/s], dense {row['dense_cold_ms']:.3f} ({row['dense_hot_ms']:.3f}) ms, "
              f"grouped {row['grouped_cold_ms']:.3f} ({row['grouped_hot_ms']:.3f}) ms; kernel "
              f"{row['kernel_vs_dense_cold']:.2f}x dense, {row['kernel_vs_grouped_cold']:.2f}x grouped", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**provenance(), "threads": torch.get_num_threads(), "avx512_bf16": cpu_kernels.has_avx512_bf16(),
                       "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
