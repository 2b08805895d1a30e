"""Triton FP8 MoE kernels at GLM-5 shapes on one GPU: checks against the references, then times.

    python bench/moe_kernels.py [--tokens 1 8 64 512 4096] [--reps 50] [--cutlass] [--out FILE]
    python bench/moe_kernels.py --interpret --small [--cutlass]  # CPU smoke run of the same code path

Shapes: hidden 6144, moe_intermediate 2048, 256 experts (all on this GPU, ~9.7 GB of FP8), top-8;
random FP8 weights with 128x128 block scales, bf16 activations, uniform random routing (each
token picks 8 distinct experts). For each token count T:

- check: experts() on the bf16 x against moe.experts_ref on x in fp32, by relative Frobenius error
  (bound 3e-2: bf16 rounding of y and of the output, ~1e-3 each, fp8 values that round the other
  way after a different fp32 summation, a few 1e-3; a wrong scale, expert or row is far above);
  fp8_triton.linear against fp8.fp8_linear likewise on a dense hidden x hidden weight (bound
  5e-3: the bf16 output's rounding and the wgmma's own accumulation within each 128-K block).
  The first call per T also autotunes;
- time (CUDA events, median of --reps after warm-up and autotuning, 256 MB written between reps
  to flush L2): quantize_act, the fused gate/up grouped GEMM, the down grouped GEMM, the combine,
  the whole experts op (routing sort included; its bytes count only weights, x and the output),
  the whole op again captured in a CUDA graph and replayed (`experts_graph`: no launch overhead,
  as a compiled bucket runs it), the dense FP8 linear, and the bf16 baseline
  moe.experts_grouped_mm (torch._grouped_mm on dequantized weights);
- with --cutlass, the CUTLASS path (ops/cutlass_moe.py) beside it, for each kernel configuration
  (`swap`: swapab128x32, `t128`: tile128x128): its check against experts_ref (bound 6e-2: it
  rounds the gate/up product to bf16 before SwiGLU, as vLLM and DeepSeek's inference do, which
  flips fp8 bytes of h near rounding ties: measured 1-1.5e-2, 3.8e-2 at one token of the small
  shape, the same as the reference itself computed with that rounding), the
  gate/up grouped GEMM (both stacks in one launch, bf16 out), the down grouped GEMM, the whole
  op eager and in a CUDA graph; then, per token count and per stage, which path wins (the choice
  `glm5c compile` records per bucket). The library is built first if it is not (~1 minute);
- report bytes moved (the active experts' weights + activations) over time against 4.3 TB/s and
  FLOPs over time against 790 TFLOP/s (bf16 matmul as measured here) and ~1580 (FP8 dense peak).
  Targets: the grouped GEMMs at decode sizes (T <= 64) move >= 70% of 4.3 TB/s; at prefill
  sizes (T >= 512) they are compared with 790 TFLOP/s; the whole layer at T = 1 is compared with
  its floor, its bytes over 4.3 TB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

HBM_TBS, BF16_TFLOPS, FP8_TFLOPS = 4.3, 790.0, 1580.0
DECODE_BW_TARGET = 0.7


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    experts: int
    top_k: int


GLM5 = Shape(6144, 2048, 256, 8)
SMALL = Shape(256, 128, 16, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--interpret", action="store_true", help="run under TRITON_INTERPRET=1 on the CPU")
    parser.add_argument("--small", action="store_true", help="small shapes (hidden 256, 16 experts, top-4)")
    parser.add_argument("--cutlass", action="store_true", help="also time the CUTLASS grouped-GEMM path")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (below)
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("skipped: no CUDA device (use --interpret --small for a CPU smoke run)")
        return 0
    shape = SMALL if args.small else GLM5
    tokens = args.tokens or ([1, 8, 64] if args.small else [1, 8, 64, 512, 4096])
    start = time.perf_counter()
    if args.cutlass and not args.interpret:
        from glm5c.ops.cutlass import build

        try:
            print(f"CUTLASS library: {build.build()}")  # cached after the first build
        except build.CutlassBuildError as e:  # the Triton rows are still worth having
            print(f"CUTLASS left out: {e}")
            args.cutlass = False
    bench = Bench(shape, "cpu" if args.interpret else "cuda", 2 if args.interpret else args.reps, args.cutlass)
    rows = [row for t in tokens for row in bench.run(t)]
    print(f"{bench.device_name}, {time.perf_counter() - start:.0f} s in all")
    print_table(rows)
    verdicts = bench.verdicts(rows)
    winners = pick_winners(rows) if args.cutlass else {}
    for line in verdicts + [line for w in winners.values() for line in w["lines"]]:
        print(line)
    if args.out:
        env = {"torch": torch.__version__, "python": platform.python_version(), "device": bench.device_name}
        with open(args.out, "w") as f:
            json.dump({"shape": asdict(shape), "env": env, "rows": rows, "verdicts": verdicts,
                       "winners": winners}, f, indent=1)  # fmt: skip
    return 0


class Bench:
    def __init__(self, shape: Shape, device: str, reps: int, cutlass: bool = False) -> None:
        import torch

        from glm5c.ops import fp8

        self.torch, self.fp8 = torch, fp8
        self.shape, self.device, self.reps, self.cutlass = shape, device, reps, cutlass
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
        self.g = g = torch.Generator(device).manual_seed(0)

        def fp8_weight(*shape: int) -> tuple:
            """FP8 values spread over e4m3's range; block scales making the weight's std ~ fan_in^-1/2."""
            n, k = shape[-2:]
            w = (torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16) * 112).clamp(-448, 448)
            blocks = (*shape[:-2], -(-n // 128), -(-k // 128))
            scale = (0.5 + torch.rand(blocks, generator=g, device=device)) * k**-0.5 / 112
            return w.to(fp8.FP8_DTYPE), scale

        e, d, i = shape.experts, shape.hidden, shape.inter
        (self.wg, sg), (self.wu, su), (self.wd, sd) = fp8_weight(e, i, d), fp8_weight(e, i, d), fp8_weight(e, d, i)
        self.scales = (sg, su, sd)
        self.dense, self.dense_scale = fp8_weight(d, d)
        self.flush = torch.empty(64 * 2**20, dtype=torch.float32, device=device) if device == "cuda" else None
        self.bf16: list | None = None
        self._graphs: list = []

    def _bf16_experts(self) -> list:
        """The baseline's dequantized weights (19 GB at GLM-5 sizes), made on first use."""
        torch, fp8 = self.torch, self.fp8
        if self.bf16 is None:
            self.bf16 = [
                torch.stack([fp8.dequantize_weight_blocks(w[e], sc[e], torch.bfloat16) for e in range(w.shape[0])])
                for w, sc in zip((self.wg, self.wu, self.wd), self.scales)
            ]
        return self.bf16

    def _time_ms(self, fn: Callable[[], object]) -> float:
        torch = self.torch
        fn()  # warm-up (and autotuning on first use)
        if self.device != "cuda":
            samples = []
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1e3)
            return statistics.median(samples)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def _graphed(self, fn: Callable[[], object]) -> Callable[[], object]:
        """fn captured in a CUDA graph (after a warm-up that compiles and autotunes) -> its replay;
        on the CPU, fn itself."""
        torch = self.torch
        if self.device != "cuda":
            return fn
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        self._graphs.append(graph)  # keep it (and its memory pool) alive while timed
        return graph.replay

    def run(self, t: int) -> list[dict]:
        torch, fp8, s = self.torch, self.fp8, self.shape
        from glm5c.ops import fp8_triton, linear_ref, moe, moe_triton

        g = self.g
        self._graphs.clear()  # the previous token count's captured graphs and their memory
        ids = torch.rand(t, s.experts, generator=g, device=self.device).topk(s.top_k, dim=1).indices  # [T, k]
        weights = torch.rand(t, s.top_k, generator=g, device=self.device)
        weights = weights / weights.sum(1, keepdim=True) * 2.5
        x = torch.randn(t, s.hidden, generator=g, device=self.device, dtype=torch.bfloat16)
        stacks = (self.wg, self.wu, self.wd)
        active = ids.unique().numel()
        p = t * s.top_k

        # -- checks: bf16 kernels against the references in fp32 on the same x
        got = moe_triton.experts(x, ids, weights, *stacks, self.scales, 0, linear_ref).float()
        want = moe.experts_ref(x.float(), ids, weights, *stacks, self.scales, 0, linear_ref)
        experts_err = ((got - want).norm() / want.norm()).item()
        lin = fp8_triton.linear(x, self.dense, self.dense_scale).float()
        lin_ref = fp8.fp8_linear(x.float(), self.dense, self.dense_scale)
        linear_err = ((lin - lin_ref).norm() / lin_ref.norm()).item()
        ok = experts_err < 3e-2 and linear_err < 5e-3 and bool(torch.isfinite(got).all())
        verdict = "ok" if ok else "FAILED"
        print(f"T={t}: check experts rel err {experts_err:.2e}, dense linear rel err {linear_err:.2e}: {verdict}")

        # -- the stages, as moe_triton.experts runs them
        order, group_ends, _ = moe.group_by_expert(ids, 0, s.experts)
        xa, xs = fp8_triton.quantize_act(x)
        h = torch.empty(p, s.inter, dtype=fp8.FP8_DTYPE, device=self.device)
        hs = torch.empty(p, -(-s.inter // 128), device=self.device)
        y = torch.empty(p, s.hidden, dtype=x.dtype, device=self.device)
        out = torch.empty_like(x)
        bucket = fp8_triton.m_bucket(p)
        gate_up_args = (xa, xs, order, group_ends, s.experts, self.wg, self.wu, self.scales[0], self.scales[1], h, hs,
                        s.inter, s.hidden, bucket)  # fmt: skip
        down_args = (h, hs, order, group_ends, s.experts, self.wd, self.scales[2], y, s.hidden, s.inter, bucket)
        const = {"DOT_PRECISION": "tf32"}

        def combine() -> None:
            moe_triton.combine(y, ids, weights, 0, s.experts, out)

        w_bytes = active * s.inter * s.hidden  # one FP8 projection of every active expert
        scale_bytes = w_bytes // (128 * 128) * 4
        d, i = s.hidden, s.inter
        stages = {  # name: (fn, bytes, flops)
            "quantize_act": (lambda: fp8_triton.quantize_act(x), t * d * 3 + t * d // 32, 0),
            "gate_up": (
                lambda: moe_triton._grouped_gemm(True, True, p, s.experts, gate_up_args, TOP_K=s.top_k, **const),
                2 * (w_bytes + scale_bytes) + p * d + p * i, 2 * p * 2 * i * d,
            ),
            "down": (
                lambda: moe_triton._grouped_gemm(False, True, p, s.experts, down_args, **const),
                w_bytes + scale_bytes + p * i + 2 * p * d, 2 * p * d * i,
            ),
            "combine": (combine, 2 * p * d + 2 * t * d, 0),
            "experts_total": (  # bytes: only the unavoidable ones (weights, x in, out)
                lambda: moe_triton.experts(x, ids, weights, *stacks, self.scales, 0, linear_ref),
                3 * (w_bytes + scale_bytes) + 4 * t * d, 6 * p * i * d,
            ),
            "experts_graph": (
                self._graphed(lambda: moe_triton.experts(x, ids, weights, *stacks, self.scales, 0, linear_ref)),
                3 * (w_bytes + scale_bytes) + 4 * t * d, 6 * p * i * d,
            ),
            "dense_linear": (
                lambda: fp8_triton.linear(x, self.dense, self.dense_scale), d * d + 2 * t * d * 2, 2 * t * d * d
            ),
        }
        rows = []
        for name, (fn, nbytes, flops) in stages.items():
            ms = self._time_ms(fn)
            rows.append(_row(t, name, ms, nbytes, flops, active, ok))
        if self.cutlass:
            routed = (x, ids, weights, want, order, group_ends, xa, xs)
            rows += self._cutlass_rows(t, routed, w_bytes, scale_bytes, active)
        bf16 = self._bf16_experts()
        ms = self._time_ms(lambda: moe.experts_grouped_mm(x, ids, weights, *bf16, (None, None, None), 0, linear_ref))
        rows.append(_row(t, "baseline_bf16_grouped_mm", ms, 2 * 3 * w_bytes + 4 * t * d, 6 * p * i * d, active, ok))
        return rows

    def _cutlass_rows(self, t: int, routed: tuple, w_bytes: int, scale_bytes: int, active: int) -> list[dict]:
        """The CUTLASS path at T tokens: check, then time its GEMMs and the whole op per config.
        routed: run()'s (x, ids, weights, reference output, order, group_ends, x fp8, x scales)."""
        torch, fp8, s = self.torch, self.fp8, self.shape
        from glm5c.ops import cutlass_moe, linear_ref

        x, ids, weights, want, order, group_ends, xa, xs = routed
        stacks, (sg, su, sd) = (self.wg, self.wu, self.wd), self.scales
        p, d, i = t * s.top_k, s.hidden, s.inter
        total_bytes = 3 * (w_bytes + scale_bytes) + 4 * t * d  # as experts_total's
        rows = []
        token = order // s.top_k
        xg = xa.view(torch.uint8).index_select(0, token).view(fp8.FP8_DTYPE)  # [P, D] sorted by expert
        xg_scale = xs.index_select(0, token)
        for name, cfg in cutlass_moe.CONFIGS.items():
            short = CUTLASS_SHORT[name]
            def whole(cfg: int = cfg):
                return cutlass_moe.experts(x, ids, weights, *stacks, self.scales, 0, linear_ref, config=cfg)

            got = whole().float()
            err = ((got - want).norm() / want.norm()).item()
            ok = err < CUTLASS_REL_BOUND and bool(torch.isfinite(got).all())
            print(f"T={t}: check cutlass experts [{name}] rel err {err:.2e}: {'ok' if ok else 'FAILED'}")
            gate_up = (self.wg, sg, self.wu, su)
            gu = cutlass_moe.grouped_gemm_fp8(xg, xg_scale, *gate_up, group_ends, cfg)
            h, hs = cutlass_moe.swiglu_quant(gu, group_ends)
            stages = {  # name: (fn, bytes, flops), as the Triton stages count them (bf16 GEMM outputs)
                f"cutlass_gate_up_{short}": (
                    lambda cfg=cfg, w=gate_up: cutlass_moe.grouped_gemm_fp8(xg, xg_scale, *w, group_ends, cfg),
                    2 * (w_bytes + scale_bytes) + p * d + 2 * p * 2 * i, 2 * p * 2 * i * d,
                ),
                f"cutlass_down_{short}": (
                    lambda cfg=cfg, h=h, hs=hs: cutlass_moe.grouped_gemm_fp8(h, hs, self.wd, sd, None, None, group_ends,
                                                                            cfg),
                    w_bytes + scale_bytes + p * i + 2 * p * d, 2 * p * d * i,
                ),
                f"cutlass_total_{short}": (whole, total_bytes, 6 * p * i * d),
                f"cutlass_graph_{short}": (self._graphed(whole), total_bytes, 6 * p * i * d),
            }
            if name == "swapab128x32":
                stages["cutlass_swiglu_quant"] = (
                    lambda gu=gu: cutlass_moe.swiglu_quant(gu, group_ends), 2 * p * 2 * i + p * i + p * i // 32, 0
                )
            for stage, (fn, nbytes, flops) in stages.items():
                rows.append(_row(t, stage, self._time_ms(fn), nbytes, flops, active, ok))
        return rows

    def verdicts(self, rows: list[dict]) -> list[str]:
        out = []
        for r in rows:
            name = f"T={r['tokens']} {r['stage']}"
            if r["stage"] in ("gate_up", "down", *CUTLASS_GEMMS) and r["tokens"] <= 64:
                frac = r["tb_s"] / HBM_TBS
                met = "met" if frac >= DECODE_BW_TARGET else "NOT met"
                out.append(f"{name}: {frac:.0%} of HBM bandwidth (target {DECODE_BW_TARGET:.0%}): {met}")
            if r["stage"] in ("gate_up", "down", *CUTLASS_GEMMS) and r["tokens"] >= 512:
                tf = r["tflops"]
                out.append(f"{name}: {tf:.0f} TFLOP/s = {tf / BF16_TFLOPS:.0%} of {BF16_TFLOPS:.0f}, "
                           f"{tf / FP8_TFLOPS:.0%} of the FP8 peak")  # fmt: skip
            if r["stage"] == "experts_total" and r["tokens"] == 1:
                us, floor_us = r["ms"] * 1e3, r["bytes"] / (HBM_TBS * 1e12) * 1e6
                out.append(f"T=1 whole MoE experts: {us:.1f} us vs floor {floor_us:.1f} us ({r['bytes'] / 1e6:.1f} MB "
                           f"at {HBM_TBS} TB/s): {floor_us / us:.0%} of the floor speed")  # fmt: skip
        if not all(r["check_ok"] for r in rows):
            out.append("CHECK FAILED for some token counts: see above")
        return out


CUTLASS_SHORT = {"swapab128x32": "swap", "tile128x128": "t128"}
CUTLASS_REL_BOUND = 6e-2
CUTLASS_GEMMS = [f"cutlass_{g}_{c}" for g in ("gate_up", "down") for c in CUTLASS_SHORT.values()]
# per stage: the Triton row and the CUTLASS rows that compute the same thing
RACES = {
    "gate_up": ["gate_up", *(f"cutlass_gate_up_{c}" for c in CUTLASS_SHORT.values())],
    "down": ["down", *(f"cutlass_down_{c}" for c in CUTLASS_SHORT.values())],
    "experts (eager)": ["experts_total", *(f"cutlass_total_{c}" for c in CUTLASS_SHORT.values())],
    "experts (CUDA graph)": ["experts_graph", *(f"cutlass_graph_{c}" for c in CUTLASS_SHORT.values())],
}


def pick_winners(rows: list[dict]) -> dict:
    """Per token count: the fastest row of each race among those whose check passed, with the
    runner-up's time -> {T: {"race": winning stage, ..., "lines": [report lines]}}."""
    out: dict = {}
    for t in sorted({r["tokens"] for r in rows}):
        by_stage = {r["stage"]: r for r in rows if r["tokens"] == t and r["check_ok"]}
        entry: dict = {"lines": []}
        for race, names in RACES.items():
            timed = sorted((by_stage[n]["ms"], n) for n in names if n in by_stage)
            if not timed:
                continue
            entry[race] = timed[0][1]
            others = ", ".join(f"{n} {ms * 1e3:.1f} us" for ms, n in timed[1:])
            entry["lines"].append(f"T={t} {race}: {timed[0][1]} wins at {timed[0][0] * 1e3:.1f} us ({others})")
        out[t] = entry
    return out


def _row(t: int, stage: str, ms: float, nbytes: int, flops: int, active: int, ok: bool) -> dict:
    return {
        "tokens": t, "stage": stage, "ms": ms, "bytes": nbytes, "flops": flops, "active_experts": active,
        "tb_s": nbytes / (ms * 1e-3) / 1e12, "tflops": flops / (ms * 1e-3) / 1e12, "check_ok": ok,
    }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    head = ("T", "stage", "active", "time us", "TB/s", "%HBM", "TFLOP/s", "%bf16", "%fp8")
    print("{:>5} {:<26} {:>6} {:>10} {:>7} {:>6} {:>8} {:>6} {:>6}".format(*head))
    for r in rows:
        bw, tf = r["tb_s"], r["tflops"]
        print(f"{r['tokens']:>5} {r['stage']:<26} {r['active_experts']:>6} {r['ms'] * 1e3:>10.1f} {bw:>7.2f} "
              f"{bw / HBM_TBS:>6.0%} {tf:>8.1f} {tf / BF16_TFLOPS:>6.0%} {tf / FP8_TFLOPS:>6.0%}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
