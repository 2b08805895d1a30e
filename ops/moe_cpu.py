"""MoE experts for a CPU's BF16 graphs: a C++ kernel that reads each chosen expert's weights once.

`experts` computes what `moe.experts_ref` defines, for BF16 activations and unquantized BF16
expert stacks, as one opaque custom op (`glm5c::moe_experts_cpu`) that a compiled graph calls:
ops/cpu/bf16_kernels.cpp (glm5c_moe_experts_bf16) groups the (token, expert) pairs and streams
every chosen expert's rows once for all of its tokens, with experts_ref's bf16 roundings. The
torch forms it replaces each waste something on a CPU: torch's grouped GEMM calls a GEMM per
expert (~15-20 us of overhead each), the dense form does E/top_k times the flops, and the
gathered form re-reads an expert per pair. Measured on mini (2-core EPYC, weights from memory,
bench/cpu_experts.py, 2026-11-30 with the kernel's quad and token-lanes tiles): 5.9x faster than
the dense form at 1 token, 2.4x at 16, 3.1x at 128; 4.2x torch's grouped GEMM at 16, 2.0x at 256.
Built and loaded by ops/cpu_kernels.py; without a compiler it runs torch's forms (dense for few
tokens per expert, else the grouped GEMM).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import cpu_kernels, moe

PACK_ROWS = cpu_kernels.BLOCK_ROWS  # rows in a tile of blocked stacks
GATHERED_MAX_PAIRS_PER_EXPERT = 0.25  # experts(): Inductor's gathered loops while T * top_k <= this * E_local, then the kernel


def _check(blocked: bool, x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate: Tensor, up: Tensor,
           down: Tensor) -> None:  # fmt: skip
    op, dims = ("moe_experts_packed_cpu", 5) if blocked else ("moe_experts_cpu", 3)
    cpu_kernels.check_tensors(op, x=(x, torch.bfloat16, 2), expert_ids=(expert_ids, torch.int64, 2),
                              expert_weights=(expert_weights, torch.float32, 2), gate_proj=(gate, torch.bfloat16, dims),
                              up_proj=(up, torch.bfloat16, dims), down_proj=(down, torch.bfloat16, dims))  # fmt: skip
    (tokens, hidden), n, inter = x.shape, gate.shape[0], gate.shape[1] * (PACK_ROWS if blocked else 1)
    if blocked:
        stacks = ((n, inter // PACK_ROWS, hidden // 2, PACK_ROWS, 2), (n, hidden // PACK_ROWS, inter // 2, PACK_ROWS, 2))
    else:
        stacks = ((n, inter, hidden), (n, hidden, inter))
    if expert_ids.shape[0] != tokens or expert_weights.shape != expert_ids.shape or gate.shape != up.shape \
            or (tuple(gate.shape), tuple(down.shape)) != stacks or (blocked and hidden % PACK_ROWS):  # fmt: skip
        raise ValueError(f"{op}: shapes do not fit: x {tuple(x.shape)}, expert_ids {tuple(expert_ids.shape)}, "
                         f"expert_weights {tuple(expert_weights.shape)}, gate_proj {tuple(gate.shape)}, up_proj "
                         f"{tuple(up.shape)}, down_proj {tuple(down.shape)}"
                         + (" (blocked: [E, N / 16, K / 2, 16, 2])" if blocked else ""))  # fmt: skip


def _kernel(blocked: bool, lib, x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate_proj: Tensor,
            up_proj: Tensor, down_proj: Tensor, first_expert: int,
            shared: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    """The kernel through ctypes, on checked inputs (`shared`: a shared expert's blocked matrices too)."""
    x, ids, w = x.contiguous(), expert_ids.contiguous(), expert_weights.contiguous()
    gate, up, down = gate_proj.contiguous(), up_proj.contiguous(), down_proj.contiguous()
    out = torch.empty_like(x)
    inter = gate.shape[1] * (PACK_ROWS if blocked else 1)
    sizes = (x.shape[0], ids.shape[1], x.shape[1], inter, gate.shape[0], first_expert, torch.get_num_threads())
    weights = (x.data_ptr(), ids.data_ptr(), w.data_ptr(), gate.data_ptr(), up.data_ptr(), down.data_ptr())
    if shared is not None:
        shared = tuple(t.contiguous() for t in shared)
        rc = lib.glm5c_moe_experts_shared_packed_bf16(*weights, *(t.data_ptr() for t in shared), out.data_ptr(), *sizes)
        op = "moe_experts_shared_packed_cpu"
    else:
        rc = (lib.glm5c_moe_experts_packed_bf16 if blocked else lib.glm5c_moe_experts_bf16)(*weights, out.data_ptr(), *sizes)
        op = "moe_experts_packed_cpu" if blocked else "moe_experts_cpu"
    cpu_kernels.check_status(op, rc)
    return out


def experts_bf16(x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate_proj: Tensor, up_proj: Tensor,
                 down_proj: Tensor, first_expert: int) -> Tensor:  # fmt: skip
    """The kernel, eagerly: x [T, D] bf16 -> [T, D] bf16 (experts_ref's result)."""
    _check(False, x, expert_ids, expert_weights, gate_proj, up_proj, down_proj)
    lib = cpu_kernels.load()
    if lib is None:
        return _torch_forms(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, first_expert)
    return _kernel(False, lib, x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, first_expert)


def _torch_forms(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, first_expert) -> Tensor:
    from . import linear_ref

    args = (x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, (None, None, None), first_expert, linear_ref)
    if x.shape[0] * expert_ids.shape[1] <= moe.DENSE_MAX_ROWS_PER_EXPERT * gate_proj.shape[0]:
        return moe.experts_dense(*args)
    return moe.experts_grouped_mm(*args)


cpu_kernels.define_op(
    "moe_experts_cpu(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor gate_proj, Tensor up_proj, "
    "Tensor down_proj, int first_expert) -> Tensor",
    lambda *args: experts_bf16(*args),
    lambda x, *_: torch.empty_like(x),
)


# Blocked weights (cpu_kernels.block_weight): where the kernel has AVX512-BF16, the model holds its
# expert stacks as [E, N / 16, K / 2, 16, 2] (Ops.pack_experts, at load), so each tile of 16 rows
# is one contiguous stream whose 64-byte loads are an element pair of all 16 rows, multiplied with
# a broadcast pair of x: every lane useful at any token count (bf16_kernels.cpp: packed_tile).
# Measured on mini's shapes (2-core Zen 5, bench/cpu_experts.py, two runs 2026-11-30): 1.06-1.51x
# faster than the kernel on [E, N, K] stacks from memory and 1.27-1.60x from L3, at 1 to 256
# tokens; whole decode steps 0.92x the time at 16 requests, 0.87x at 1 (where the graphs held
# Inductor's gathered loops: blocked stacks take the kernel at every size).


def pack_experts(gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The model's expert stacks as `experts` runs them fastest: blocked (cpu_kernels.block_weight)
    where the kernel has AVX512-BF16 and the stacks are BF16 with I and D multiples of 16; else as they are."""
    stacks = (gate_proj, up_proj, down_proj)
    if not all(cpu_kernels.blockable(w) for w in stacks):
        return stacks
    return tuple(cpu_kernels.block_weight(w) for w in stacks)


def experts_packed_bf16(x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate_proj: Tensor, up_proj: Tensor,
                        down_proj: Tensor, first_expert: int) -> Tensor:  # fmt: skip
    """experts_bf16 over blocked stacks (pack_experts), eagerly: x [T, D] bf16 -> [T, D] bf16."""
    _check(True, x, expert_ids, expert_weights, gate_proj, up_proj, down_proj)
    return _kernel(True, cpu_kernels.blocked_kernels("moe_experts_packed_cpu"), x, expert_ids, expert_weights, gate_proj,
                   up_proj, down_proj, first_expert)  # fmt: skip


cpu_kernels.define_op(
    "moe_experts_packed_cpu(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor gate_proj, Tensor up_proj, "
    "Tensor down_proj, int first_expert) -> Tensor",
    lambda *args: experts_packed_bf16(*args),
    lambda x, *_: torch.empty_like(x),
)


def experts_shared_packed_bf16(x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate_proj: Tensor,
                               up_proj: Tensor, down_proj: Tensor, shared_gate: Tensor, shared_up: Tensor,
                               shared_down: Tensor, first_expert: int) -> Tensor:  # fmt: skip
    """experts_packed_bf16 and a shared expert (its blocked gate, up [I / 16, D / 2, 16, 2] and down
    [D / 16, I / 2, 16, 2]) in one kernel call, eagerly: x [T, D] bf16 -> routed + shared [T, D] bf16."""
    _check(True, x, expert_ids, expert_weights, gate_proj, up_proj, down_proj)
    op = "moe_experts_shared_packed_cpu"
    cpu_kernels.check_tensors(op, shared_gate=(shared_gate, torch.bfloat16, 4), shared_up=(shared_up, torch.bfloat16, 4),
                              shared_down=(shared_down, torch.bfloat16, 4))  # fmt: skip
    if not _shared_fits(gate_proj, down_proj, shared_gate, shared_up, shared_down):
        raise ValueError(f"{op}: the shared expert's gate {tuple(shared_gate.shape)}, up {tuple(shared_up.shape)}, down "
                         f"{tuple(shared_down.shape)} are not one expert of gate_proj {tuple(gate_proj.shape)} and "
                         f"down_proj {tuple(down_proj.shape)}")  # fmt: skip
    return _kernel(True, cpu_kernels.blocked_kernels(op), x, expert_ids, expert_weights, gate_proj, up_proj,
                   down_proj, first_expert, (shared_gate, shared_up, shared_down))  # fmt: skip


def _shared_fits(gate_proj: Tensor, down_proj: Tensor, shared_gate: Tensor, shared_up: Tensor,
                 shared_down: Tensor) -> bool:  # fmt: skip
    """Whether the shared expert's matrices are shaped as one expert of the blocked stacks."""
    return (shared_gate.shape == shared_up.shape == gate_proj.shape[1:] and shared_down.shape == down_proj.shape[1:]
            and gate_proj.dim() == 5)  # fmt: skip


cpu_kernels.define_op(
    "moe_experts_shared_packed_cpu(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor gate_proj, "
    "Tensor up_proj, Tensor down_proj, Tensor shared_gate, Tensor shared_up, Tensor shared_down, int first_expert) "
    "-> Tensor",
    lambda *args: experts_shared_packed_bf16(*args),
    lambda x, *_: torch.empty_like(x),
)


def experts(
    x: Tensor,  # [T, D] bf16
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D] bf16, or blocked: [E_local, I / 16, D / 2, 16, 2] (pack_experts)
    up_proj: Tensor,  # [E_local, I, D] bf16, or blocked (pack_experts)
    down_proj: Tensor,  # [E_local, D, I] bf16, or blocked
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """Ops.experts for a CPU's BF16 graphs. Blocked stacks (pack_experts, where the kernel has
    AVX512-BF16): the packed kernel as the opaque op `glm5c::moe_experts_packed_cpu` at every size.
    Stacks as loaded: the kernel as the opaque op `glm5c::moe_experts_cpu`
    (the graph sees "[T, D] in, [T, D] out"), except at the ends. For so few tokens that at most a
    quarter of the experts can be chosen (mini: 1 token) `moe.experts_gathered`, which Inductor
    fuses into the graph's own loops, is a little faster (whole mini decode graphs,
    bench/cpu_graph_ops.py, the kernel's op vs gathered: 1.03x slower at 1 token with the op's C++
    implementation, 1.06x through Python; 1.11x faster at 4, 1.26x at 16). Beyond, the kernel at
    any size: with token-lanes tiles from 12 tokens per expert it beats torch's grouped GEMM 2.0x
    at 256 tokens (64 pairs per expert) and 1.6x at 512 (bench/cpu_experts.py; until 2026-11-30
    the grouped GEMM took over 32 pairs per expert). The choice is by static shape, so each
    bucket's graph holds one. Unquantized weights only."""
    moe._require_unquantized(scales, "moe_cpu.experts")
    if gate_proj.dim() == 5:  # blocked (pack_experts): the kernel at every size
        return torch.ops.glm5c.moe_experts_packed_cpu(x, expert_ids, expert_weights.float(), gate_proj, up_proj,
                                                      down_proj, first_expert)  # fmt: skip
    pairs, n_experts = x.shape[0] * expert_ids.shape[1], gate_proj.shape[0]
    args = (x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, scales, first_expert, linear)
    if torch.compiler.is_compiling() and pairs <= GATHERED_MAX_PAIRS_PER_EXPERT * n_experts:
        return moe.experts_gathered(*args)
    return torch.ops.glm5c.moe_experts_cpu(x, expert_ids, expert_weights.float(), gate_proj, up_proj, down_proj,
                                           first_expert)  # fmt: skip


def route_bf16(x: Tensor, gate_weight: Tensor, correction_bias: Tensor, top_k: int, n_group: int, topk_group: int,
               norm_topk_prob: bool, scaling_factor: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The router kernel, eagerly: x [T, D] bf16, gate_weight [E, D] fp32, correction_bias [E] fp32
    -> (weights [T, top_k] fp32, expert ids [T, top_k] int64), as moe.route_ref."""
    cpu_kernels.check_tensors("route_cpu", x=(x, torch.bfloat16, 2), gate_weight=(gate_weight, torch.float32, 2),
                              correction_bias=(correction_bias, torch.float32, 1))  # fmt: skip
    (tokens, hidden), n_experts = x.shape, gate_weight.shape[0]
    if gate_weight.shape[1] != hidden or correction_bias.shape[0] != n_experts:
        raise ValueError(f"route_cpu: shapes do not fit: x {tuple(x.shape)}, gate_weight {tuple(gate_weight.shape)}, "
                         f"correction_bias {tuple(correction_bias.shape)}")  # fmt: skip
    lib = cpu_kernels.load()
    if lib is None:
        return moe.route_ref(x, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                             scaling_factor)  # fmt: skip
    x, gate, bias = x.contiguous(), gate_weight.contiguous(), correction_bias.contiguous()
    weights = torch.empty(tokens, top_k)
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    rc = lib.glm5c_route_bf16(x.data_ptr(), gate.data_ptr(), bias.data_ptr(), weights.data_ptr(), ids.data_ptr(),
                              tokens, hidden, n_experts, top_k, n_group, topk_group, int(norm_topk_prob),
                              scaling_factor, torch.get_num_threads())  # fmt: skip
    if rc != 0:
        raise ValueError(f"route_cpu: top_k {top_k}, n_group {n_group}, topk_group {topk_group} do not fit "
                         f"{n_experts} experts")  # fmt: skip
    return weights, ids


cpu_kernels.define_op(
    "route_cpu(Tensor x, Tensor gate_weight, Tensor correction_bias, int top_k, int n_group, int topk_group, "
    "bool norm_topk_prob, float scaling_factor) -> (Tensor, Tensor)",
    lambda *args: route_bf16(*args),
    lambda x, gate_weight, correction_bias, top_k, *_: (x.new_empty(x.shape[0], top_k, dtype=torch.float32),
                                                         x.new_empty(x.shape[0], top_k, dtype=torch.int64)),
)


def route(x: Tensor, gate_weight: Tensor, correction_bias: Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling_factor: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Ops.route for a CPU's BF16 graphs: the router kernel as the opaque op `glm5c::route_cpu`
    for BF16 activations and an fp32 gate (else moe.route_ref). In a graph the reference is a GEMM
    (a BLAS call), three top-k (ATen calls) and Inductor's loops between them, ~20 us a layer of a
    16-token mini step; the op is one call."""
    if x.dtype == torch.bfloat16 and x.dim() == 2 and gate_weight.dtype == correction_bias.dtype == torch.float32:
        return torch.ops.glm5c.route_cpu(x, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                                         scaling_factor)  # fmt: skip
    return moe.route_ref(x, gate_weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling_factor)


def experts_shared(
    x: Tensor,  # [T, D] bf16
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # as `experts` takes them
    up_proj: Tensor,
    down_proj: Tensor,
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    shared: tuple[Tensor, Tensor, Tensor],  # the shared expert's gate, up, down weights (as pack_linear left them)
    shared_scales: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> Tensor:
    """Ops.experts_shared for a CPU's BF16 graphs: the routed experts plus the shared expert,
    routed + down(silu(gate(x)) * up(x)) in bf16. Where the stacks are blocked (pack_experts) and
    the shared expert's matrices are one expert of them (GLM-5: one shared expert of the routed
    experts' size), the kernel runs it as one more expert that every token chose, in the routed
    experts' call (`glm5c::moe_experts_shared_packed_cpu`): one parallel region, x packed once, and
    the two threads' split balanced over both. (Mini, 16-token decode steps on the 2-core dev
    machine: a step without the shared expert at all took 0.913x the time, ~37 us a layer for
    three ops of 0.8 MB between them.) Else `experts`, then the shared MLP through `linear`."""
    sg, su, sd = shared
    if all(s is None for s in shared_scales) and _shared_fits(gate_proj, down_proj, sg, su, sd):
        moe._require_unquantized(scales, "moe_cpu.experts_shared")
        return torch.ops.glm5c.moe_experts_shared_packed_cpu(x, expert_ids, expert_weights.float(), gate_proj, up_proj,
                                                             down_proj, sg, su, sd, first_expert)  # fmt: skip
    routed = experts(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, scales, first_expert, linear)
    g, u, s = shared_scales
    return routed + linear(torch.nn.functional.silu(linear(x, sg, g)) * linear(x, su, u), sd, s)
