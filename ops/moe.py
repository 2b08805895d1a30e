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
