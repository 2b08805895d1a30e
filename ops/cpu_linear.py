"""Linear layers for a CPU's BF16 graphs, chosen by rows (a static shape, so per bucket).

A BF16 GEMM library call on a CPU (oneDNN through aten::mm / bmm) costs ~15-20 us before it reads
anything (bench/results/2026-11-30-cpu-gemv.md): more than reading a 512x512 weight takes. So:
  - one row: `gemv`, a multiply-and-sum that Inductor emits as one vectorised loop fused with
    whatever produces x (in a graph; eagerly, as for the LM head, the kernel below: mini's
    [1, 512] x [1408, 512] 79 -> 21 us);
  - 2 to KERNEL_MAX_ROWS rows: the C++ kernel (ops/cpu/bf16_kernels.cpp: glm5c_linear_bf16) as the
    opaque op `glm5c::linear_bf16_cpu`: threads split the weight rows and stream each once for
    all rows of x (~5 us a call through the dispatcher). gemv took up to 4 rows until, measured
    again once the kernel had register tiles and read MLA's weight views in place, whole mini
    decode graphs at 2 and 4 tokens took 0.86x and 0.80x the time with the kernel
    (bench/results/2026-11-30-cpu-tiles.md);
  - beyond: torch's GEMM (linear_ref), except per-head weights, which the kernel takes at any rows.
Other dtypes (the indexer's fp32 weights_proj) take gemv up to FP32_GEMV_MAX_ROWS rows, then torch.
Per-head weights [H, out, in] (MLA's absorbed projections) take the same path, head by head, read
in place as the model passes them (w_uk^T: a transposed view, w_uv: a split of kv_b_proj's weight;
copying them cost ~40 us a call). Whole mini decode graphs with the kernel instead of torch's GEMMs
(bench/cpu_graph_ops.py): 0.82x the time at 8 tokens, 0.90x at 16 (before its register tiles).
With token-lanes tiles (no reduction across lanes; from 17 rows two vectors of rows a tile) it beats
oneDNN on mini's weights from memory at every size measured: 1.5-2.5x at 64 rows, 1.2-1.9x at
128, 1.05-1.36x at 256, 1.01-1.15x at 512 (bench/results/2026-11-30-cpu-lanes.md), so it takes
bf16 linears up to KERNEL_MAX_ROWS (the measured range); per-head weights at any rows (MLA's
absorbed projections at 256 rows: 44 vs 80 us, w_uk^T).

Where the kernel has AVX512-BF16 the model's linear weights are blocked at load (pack_linear, as
Ops.pack_linear): [out / 16, in / 2, 16, 2], each tile of 16 rows one contiguous stream, multiplied
with x's pairs broadcast, every lane useful at any row count (bf16_kernels.cpp: packed_tile); MLA's
absorbed per-head weights as blocked copies [H, out / 16, in / 2, 16, 2] (MLAttention.pack_absorbed;
kv_b_proj, whose views they are, stays as loaded). Those take the packed kernel at every row count,
the op `glm5c::linear_packed_cpu` (no gemv, no oneDNN: both read [out, in]). Measured on mini's
weights from memory (2-core Zen 5, interleaved, 2026-11-30): 1.04-1.32x the kernel on [out, in]
at 1-16 rows, even at 64-256; whole decode steps 0.95x the time at 16 requests (linears), then
0.94x (the absorbed projections at 16 tokens: 21 -> 6.8 us a call for W_uk^T, which ran as
weighted_rows' x @ W, and 15 -> 5.5 us for W_uv).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .gemv import gemv

GEMV_MAX_ROWS = 1
FP32_GEMV_MAX_ROWS = 4
KERNEL_MAX_ROWS = 512


def linear_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """The kernel, eagerly: x [T, in] @ weight [out, in]^T -> [T, out], or per head x [T, H, in] with
    weight [H, out, in] -> [T, H, out]; bf16 in and out, fp32 accumulation."""
    heads = weight.shape[0] if weight.dim() == 3 else 1
    want_x = (x.shape[0], heads, weight.shape[-1]) if weight.dim() == 3 else (x.shape[0], weight.shape[-1])
    if x.dim() != len(want_x) or tuple(x.shape) != want_x or weight.dim() not in (2, 3) \
            or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu" \
            or weight.device.type != "cpu":  # fmt: skip
        raise ValueError(f"linear_bf16_cpu: x {x.dtype} {tuple(x.shape)} on {x.device} does not fit weight "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}: expected bf16 on cpu, "
                         "x [T, in] for weight [out, in] or x [T, H, in] for weight [H, out, in]")  # fmt: skip
    lib = cpu_kernels.load()
    if lib is None:
        if weight.dim() == 3:
            return torch.bmm(x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)
        return F.linear(x, weight)
    x, weight, transposed = kernel_layout(x, weight)
    out = x.new_empty(*x.shape[:-1], weight.shape[-2])
    rc = lib.glm5c_linear_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], heads,
                               weight.shape[-1], weight.shape[-2], x.stride(0), x.stride(1) if heads > 1 else 0,
                               weight.stride(0) if heads > 1 else 0, weight.stride(-1 if transposed else -2),
                               int(transposed), torch.get_num_threads())  # fmt: skip
    cpu_kernels.check_status("linear_bf16_cpu", rc)
    return out


def kernel_layout(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(x, weight, transposed) as the kernel reads them in place: rows of x and of the weight with
    adjacent elements, any other strides (a head's slice of a fused weight, a split of q); or the
    weight's transpose stored row by row (MLA's w_uk^T, a view of kv_b_proj: transposed=True).
    Anything else is copied (bf16_ops.cpp decides the same)."""
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        x = x.contiguous()
    if weight.stride(-1) == 1 or weight.shape[-1] == 1:
        return x, weight, False
    if weight.stride(-2) == 1:
        return x, weight, True
    return x, weight.contiguous(), False


cpu_kernels.define_op(
    "linear_bf16_cpu(Tensor x, Tensor weight) -> Tensor",
    lambda x, weight: linear_bf16(x, weight),
    lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[-2]),
)


def pack_linear(weight: Tensor) -> Tensor:
    """A linear layer's weight [out, in] (or a per-head one [H, out, in]) as linear_cpu runs it
    fastest (Ops.pack_linear, at load): blocked [(H,) out / 16, in / 2, 16, 2]
    (cpu_kernels.block_weight) where the kernel has AVX512-BF16 and the weight is BF16 with out a
    multiple of 16 and in even; else as it is."""
    return cpu_kernels.block_weight(weight) if weight.dim() in (2, 3) and cpu_kernels.blockable(weight) else weight


def _packed_out_shape(x: Tensor, weight: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[-4] * cpu_kernels.BLOCK_ROWS)


def _check_packed(op: str, x: Tensor, weight: Tensor) -> None:
    """x fits the blocked weight (a linear's [out / 16, in / 2, 16, 2], or per head [H, ...]): ValueError naming both."""
    heads = weight.shape[0] if weight.dim() == 5 else 1
    want_x = (x.shape[0], heads, 2 * weight.shape[-3]) if weight.dim() == 5 else (x.shape[0], 2 * weight.shape[-3])
    if weight.dim() not in (4, 5) or tuple(weight.shape[-2:]) != (cpu_kernels.BLOCK_ROWS, 2) or x.dim() != len(want_x) \
            or tuple(x.shape) != want_x or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 \
            or x.device.type != "cpu" or weight.device.type != "cpu":  # fmt: skip
        raise ValueError(f"{op}: x {x.dtype} {tuple(x.shape)} on {x.device} does not fit blocked weight "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}: expected bf16 on cpu, x [T, in] "
                         "for weight [out / 16, in / 2, 16, 2] or x [T, H, in] for [H, out / 16, in / 2, 16, 2]")  # fmt: skip


def linear_packed_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """The kernel over a blocked weight (pack_linear), eagerly: x [T, in] @ weight [out / 16, in / 2,
    16, 2] -> [T, out], or per head x [T, H, in] with weight [H, out / 16, in / 2, 16, 2] -> [T, H,
    out]; bf16 in and out, fp32 accumulation."""
    _check_packed("linear_packed_cpu", x, weight)
    lib = cpu_kernels.blocked_kernels("linear_packed_cpu")
    heads = weight.shape[0] if weight.dim() == 5 else 1
    x, weight = x if x.stride(-1) == 1 else x.contiguous(), weight.contiguous()
    out = x.new_empty(_packed_out_shape(x, weight))
    rc = lib.glm5c_linear_packed_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], heads, x.shape[-1],
                                      out.shape[-1], x.stride(0), x.stride(1) if heads > 1 else 0,
                                      torch.get_num_threads())  # fmt: skip
    cpu_kernels.check_status("linear_packed_cpu", rc)
    return out


cpu_kernels.define_op(
    "linear_packed_cpu(Tensor x, Tensor weight) -> Tensor",
    lambda x, weight: linear_packed_bf16(x, weight),
    lambda x, weight: x.new_empty(_packed_out_shape(x, weight)),
)


_linear_packed = torch.ops.glm5c.linear_packed_cpu.default


def linear_cpu(x: Tensor, weight: Tensor, scale_inv: Tensor | None = None) -> Tensor:
    """Ops.linear for a CPU's compiled graphs: gemv, the kernel or linear_ref by rows (above); a
    blocked weight (pack_linear) by the packed kernel at any rows. x [..., in] for weight [out, in]
    or blocked [out / 16, in / 2, 16, 2]; [T, H, in] for a per-head weight [H, out, in] or blocked
    [H, out / 16, in / 2, 16, 2]."""
    if weight.dim() == 4:  # blocked (pack_linear): the kernel at any rows
        if x.dim() == 2:  # (the LM head's call, eager after every step: as little Python as can be)
            return _linear_packed(x, weight)
        rows = x.numel() // x.shape[-1]
        out = _linear_packed(x.reshape(rows, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], out.shape[-1])
    if weight.dim() == 5:  # blocked per-head weights: x [T, H, in]
        return _linear_packed(x, weight)
    from . import linear_ref

    heads = weight.shape[0] if weight.dim() == 3 else 1
    rows = x.numel() // (heads * x.shape[-1])
    if scale_inv is None and x.dtype == weight.dtype == torch.bfloat16:
        # eagerly (the LM head, outside the graphs) gemv would be a GEMM call: the kernel instead
        if rows <= GEMV_MAX_ROWS and torch.compiler.is_compiling():
            return gemv(x, weight)
        if weight.dim() == 3:
            return torch.ops.glm5c.linear_bf16_cpu(x, weight)
        if rows <= KERNEL_MAX_ROWS:
            out = torch.ops.glm5c.linear_bf16_cpu(x.reshape(rows, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], weight.shape[-2])  # (not -1: zero rows, as a step without logits has)
    elif scale_inv is None and rows <= FP32_GEMV_MAX_ROWS:
        return gemv(x, weight)
    return linear_ref(x, weight, scale_inv)


def linear_packed_multi_bf16(x: Tensor, weights: list[Tensor]) -> list[Tensor]:
    """The kernel over several blocked weights (pack_linear) reading the same x, eagerly: x [T, in]
    -> [T, out_i] per weight [out_i / 16, in / 2, 16, 2], as linear_packed_bf16 each."""
    if not weights:
        raise ValueError("linear_packed_multi_cpu: no weights")
    for w in weights:
        if w.dim() != 4:
            raise ValueError(f"linear_packed_multi_cpu: weight {tuple(w.shape)} is not blocked [out / 16, in / 2, 16, 2]")
        _check_packed("linear_packed_multi_cpu", x, w)
    lib = cpu_kernels.blocked_kernels("linear_packed_multi_cpu")
    x, weights = x if x.stride(-1) == 1 else x.contiguous(), [w.contiguous() for w in weights]
    outs = [x.new_empty(_packed_out_shape(x, w)) for w in weights]
    pointers = (ctypes.c_void_p * len(weights))
    rc = lib.glm5c_linear_packed_multi_bf16(x.data_ptr(), len(weights), pointers(*(w.data_ptr() for w in weights)),
                                            pointers(*(o.data_ptr() for o in outs)),
                                            (ctypes.c_int64 * len(outs))(*(o.shape[-1] for o in outs)), x.shape[0],
                                            x.shape[-1], x.stride(0), torch.get_num_threads())  # fmt: skip
    cpu_kernels.check_status("linear_packed_multi_cpu", rc)
    return outs


cpu_kernels.define_op(
    "linear_packed_multi_cpu(Tensor x, Tensor[] weights) -> Tensor[]",
    lambda x, weights: linear_packed_multi_bf16(x, list(weights)),
    lambda x, weights: [x.new_empty(_packed_out_shape(x, w)) for w in weights],
)


def linear_many_cpu(x: Tensor, weights: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
    """Ops.linear_many for a CPU's BF16 graphs: linear layers that read the same x [T, in] in one
    call of the packed kernel (`glm5c::linear_packed_multi_cpu`) when every weight is blocked
    (pack_linear), else linear_cpu each. Per layer of a 16-token mini step this saves the calls
    and thread forks of two linears of three (q_a, kv_a, the indexer's keys) and of one of two (an
    MLP's gate and up), and packs x once."""
    if x.dim() == 2 and x.dtype == torch.bfloat16 and all(w.dim() == 4 and s is None for w, s in weights):
        return list(torch.ops.glm5c.linear_packed_multi_cpu(x, [w for w, _ in weights]))
    return [linear_cpu(x, w, s) for w, s in weights]
