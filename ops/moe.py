"""Mixture-of-experts routing and expert computation: plain-torch references.

Routing (GLM-5 / DeepSeek-V3 "noaux_tc"): sigmoid scores in fp32; experts are *chosen* by
score + correction bias, within the best `topk_group` groups when n_group > 1, but *weighted*
by the unbiased score, normalised to sum 1 and scaled by `routed_scaling_factor`.
Experts are SwiGLU: down(silu(gate(x)) * up(x)). Expert weights are stacked per rank,
[n_local_experts, out, in], covering global experts [first_expert, first_expert + n_local).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .gemv import gemv


def route_ref(
    x: Tensor,  # [T, D]
    gate_weight: Tensor,  # [E, D] fp32
    correction_bias: Tensor,  # [E] fp32
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling_factor: float,
) -> tuple[Tensor, Tensor]:
    """-> (weights [T, top_k] fp32, expert ids [T, top_k] int64)."""
    num_experts = gate_weight.shape[0]
    scores = torch.sigmoid(F.linear(x.float(), gate_weight.float()))  # [T, E]
    choice = scores + correction_bias.float()
    if n_group > 1:
        grouped = choice.view(-1, n_group, num_experts // n_group)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(num_experts // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices  # [T, top_k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


def experts_ref(
    x: Tensor,  # [T, D]
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D]
    up_proj: Tensor,  # [E_local, I, D]
    down_proj: Tensor,  # [E_local, D, I]
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],  # FP8 block scales per stack, or None
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """Weighted sum of the chosen local experts' outputs -> [T, D]; experts on other ranks add 0."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gate_s, up_s, down_s = scales
    for local in range(gate_proj.shape[0]):
        token_idx, slot = torch.where(expert_ids == first_expert + local)
        if token_idx.numel() == 0:
            continue
        h = x[token_idx]  # [n, D]
        act = F.silu(linear(h, gate_proj[local], _at(gate_s, local))) * linear(h, up_proj[local], _at(up_s, local))
        y = linear(act, down_proj[local], _at(down_s, local))  # [n, D]
        out.index_add_(0, token_idx, y.float() * expert_weights[token_idx, slot, None])
    return out.to(x.dtype)


def _at(scales: Tensor | None, expert: int) -> Tensor | None:
    return None if scales is None else scales[expert]


def group_by_expert(expert_ids: Tensor, first_expert: int, n_local: int) -> tuple[Tensor, Tensor, Tensor]:
    """Shape-static grouping of (token, slot) pairs by local expert, with no host sync.

    expert_ids [T, k] -> (order [T*k]: pair indices sorted by local expert, other ranks' pairs last;
    group_ends [n_local] int32: cumulative row counts, the offsets a grouped GEMM takes;
    is_local [T*k] bool, in sorted order)."""
    local = expert_ids.flatten() - first_expert  # [T*k]
    is_local = (local >= 0) & (local < n_local)
    key = torch.where(is_local, local, n_local)  # pairs for other ranks sort into a last, unused group
    order = key.argsort(stable=True)
    # rows with key < e + 1; not bincount, whose output size (and a CUDA host sync) follows max(key)
    group_ends = torch.searchsorted(key[order], torch.arange(1, n_local + 1, device=key.device), out_int32=True)
    return order, group_ends, is_local[order]


def _require_unquantized(scales: tuple[Tensor | None, Tensor | None, Tensor | None], op: str) -> None:
    """The shape-static expert paths multiply BF16/FP32 weights; an FP8 checkpoint is dequantized on load for them."""
    if any(s is not None for s in scales):
        raise ValueError(f"{op} takes unquantized expert weights (load with keep_fp8=False)")


def experts_grouped_mm(
    x: Tensor,  # [T, D]
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D]
    up_proj: Tensor,  # [E_local, I, D]
    down_proj: Tensor,  # [E_local, D, I]
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """experts_ref's result with every shape fixed by T (no data-dependent shapes, so it compiles
    into one graph): pairs grouped by expert, then torch's grouped GEMM. BF16/FP32 weights only
    (an FP8 checkpoint is dequantized on load for this path)."""
    _require_unquantized(scales, "experts_grouped_mm")
    top_k = expert_ids.shape[1]
    order, group_ends, is_local = group_by_expert(expert_ids, first_expert, gate_proj.shape[0])
    token = order // top_k  # [T*k] token of each sorted pair
    xs = x[token]  # [T*k, D]
    gate = torch._grouped_mm(xs, gate_proj.transpose(-2, -1), offs=group_ends)  # [T*k, I]
    up = torch._grouped_mm(xs, up_proj.transpose(-2, -1), offs=group_ends)
    y = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=group_ends)  # [T*k, D]
    # rows past the last group (other ranks' pairs) are left unwritten by the GEMM: select, not scale
    y = torch.where(is_local[:, None], y.float() * expert_weights.flatten()[order, None], 0.0)
    # back in (token, slot) order, then each token's top_k rows summed: an index_add_ over `token`
    # would compile to atomic adds (a CPU's 256-token prefill graph spent ~28% of its time in their
    # compare-and-swap loops) and sum in no fixed order
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return y[inverse].view(x.shape[0], top_k, y.shape[-1]).sum(1).to(x.dtype)  # [T, D]


def experts_dense(
    x: Tensor,  # [T, D]
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D]
    up_proj: Tensor,  # [E_local, I, D]
    down_proj: Tensor,  # [E_local, D, I]
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """experts_ref's result with every token through every local expert as three batched GEMMs,
    each (token, expert) output then weighted by its routing weight (0 where not chosen). E/top_k
    times the flops of the sparse form but three calls instead of 3 x E: faster on a CPU while
    tokens are few (bench/results/2026-11-29-cpu-experts.md). BF16/FP32 weights only."""
    _require_unquantized(scales, "experts_dense")
    n_experts, tokens = gate_proj.shape[0], x.shape[0]
    local = expert_ids - first_expert
    local = torch.where((local >= 0) & (local < n_experts), local, n_experts)  # other ranks' -> a spare column
    routing = torch.zeros(tokens, n_experts + 1, dtype=torch.float32, device=x.device)
    routing = routing.scatter_add_(1, local, expert_weights.float())[:, :n_experts]  # [T, E]; repeats add up
    xe = x.unsqueeze(0).expand(n_experts, tokens, x.shape[1])  # [E, T, D]
    gate = torch.bmm(xe, gate_proj.transpose(1, 2))  # [E, T, I]
    up = torch.bmm(xe, up_proj.transpose(1, 2))
    y = torch.bmm(F.silu(gate) * up, down_proj.transpose(1, 2))  # [E, T, D]
    return (y.float() * routing.T[:, :, None]).sum(0).to(x.dtype)


def experts_gathered(
    x: Tensor,  # [T, D]
    expert_ids: Tensor,  # [T, top_k] global expert ids
    expert_weights: Tensor,  # [T, top_k] fp32
    gate_proj: Tensor,  # [E_local, I, D]
    up_proj: Tensor,  # [E_local, I, D]
    down_proj: Tensor,  # [E_local, D, I]
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """experts_ref's result reading only the chosen experts' weights: each (token, slot) pair runs
    its own expert's three matrix-vector products (`gemv`, the expert picked by an indexed load
    inside the loop). Reads T * top_k experts (repeats from cache) where experts_dense reads all
    E_local and does E_local / top_k times the flops; compiled (Inductor fuses the indexed load
    into the loop) the fastest form for a few pairs (moe_cpu.experts). Eagerly the indexing copies
    the chosen experts' weights. Pairs for other ranks' experts read local expert 0 and weigh 0."""
    _require_unquantized(scales, "experts_gathered")
    tokens, top_k = expert_ids.shape
    n_experts = gate_proj.shape[0]
    local = expert_ids - first_expert
    mine = (local >= 0) & (local < n_experts)
    pair_expert = torch.where(mine, local, 0).flatten()  # [P = T * top_k]
    pair_weight = torch.where(mine, expert_weights.float(), 0.0).reshape(tokens * top_k, 1)
    xp = x.unsqueeze(1).expand(tokens, top_k, x.shape[1]).reshape(tokens * top_k, x.shape[1])  # [P, D]
    gate = gemv(xp, gate_proj[pair_expert])  # [P, I]
    up = gemv(xp, up_proj[pair_expert])
    y = gemv(F.silu(gate) * up, down_proj[pair_expert])  # [P, D]
    return (y.float() * pair_weight).view(tokens, top_k, -1).sum(1).to(x.dtype)


DENSE_MAX_ROWS_PER_EXPERT = 16  # moe_cpu's torch fallback: dense while T * top_k <= this * E_local, else grouped


@torch.library.custom_op("glm5c::moe_experts", mutates_args=())
def _moe_experts_op(
    x: Tensor, expert_ids: Tensor, expert_weights: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor,
    gate_scale: Tensor | None, up_scale: Tensor | None, down_scale: Tensor | None, first_expert: int,
) -> Tensor:  # fmt: skip
    from . import linear_ref

    scales = (gate_scale, up_scale, down_scale)
    if x.dtype == torch.bfloat16 and gate_scale is None:  # one grouped GEMM per projection
        return experts_grouped_mm(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, scales, first_expert,
                                  linear_ref)  # fmt: skip
    return experts_ref(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, scales, first_expert, linear_ref)


@_moe_experts_op.register_fake
def _(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, gate_scale, up_scale, down_scale, first_expert):
    return torch.empty_like(x)


def experts_op(
    x: Tensor,
    expert_ids: Tensor,
    expert_weights: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    scales: tuple[Tensor | None, Tensor | None, Tensor | None],
    first_expert: int,
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """The reference experts as one opaque custom op (`glm5c::moe_experts`), so a compiled graph
    can hold the data-dependent per-expert loop: the compiler sees only "[T, D] in, [T, D] out".
    (`linear` is fixed to the reference inside the op.)"""
    return torch.ops.glm5c.moe_experts(x, expert_ids, expert_weights, gate_proj, up_proj, down_proj, *scales,
                                       first_expert)  # fmt: skip
