"""Kernels the model calls, behind one small interface.

`Ops` names every operation that has (or will have) a fast kernel; the model receives an
`Ops` and calls nothing else for them. `REFERENCE` holds the plain-torch implementations, which
define what each fast kernel must compute and run anywhere (eager or compiled, CPU or GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dsa, fp8, moe, moe_cpu  # moe_cpu registers glm5c::moe_experts_cpu, which CPU graphs call
from .gemv import gemv


def linear_ref(x: Tensor, weight: Tensor, scale_inv: Tensor | None = None) -> Tensor:
    """y = x @ weight.T; an FP8 weight (with its 128x128 block scales) runs as a block-scaled FP8 GEMM.
    A per-head weight [H, out, in] applies head h's matrix to x[:, h] ([T, H, in] -> [T, H, out]):
    MLA's absorbed key and value projections."""
    if weight.dim() == 3:
        if scale_inv is not None or x.dim() != 3 or x.shape[1] != weight.shape[0]:
            raise ValueError(f"per-head linear: x {tuple(x.shape)} does not fit [T, H, in] for weight "
                             f"{tuple(weight.shape)} (unquantized only)")  # fmt: skip
        return torch.bmm(x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)
    if scale_inv is None:
        return F.linear(x, weight)
    return fp8.fp8_linear(x, weight, scale_inv)


GEMV_MAX_ROWS = 4  # linear_cpu: gemv for at most this many rows (bench/results/2026-11-30-cpu-gemv.md)


def linear_cpu(x: Tensor, weight: Tensor, scale_inv: Tensor | None = None) -> Tensor:
    """A CPU's compiled linear: `gemv` for up to GEMV_MAX_ROWS rows (decode buckets 1-4), where a
    GEMM call is mostly overhead and the loop streams the weight at memory speed; otherwise
    linear_ref. The choice is by static shape, so each bucket's graph holds one of the two."""
    heads = weight.shape[0] if weight.dim() == 3 else 1
    if scale_inv is None and x.numel() <= GEMV_MAX_ROWS * heads * x.shape[-1]:
        return gemv(x, weight)
    return linear_ref(x, weight, scale_inv)


@dataclass(frozen=True)
class Ops:
    linear: Callable[..., Tensor]
    route: Callable[..., tuple[Tensor, Tensor]]
    experts: Callable[..., Tensor]
    index_cache_write: Callable[..., None]
    indexer_topk: Callable[..., Tensor]
    sparse_mla: Callable[..., Tensor]


REFERENCE = Ops(
    linear=linear_ref,
    route=moe.route_ref,
    experts=moe.experts_ref,
    index_cache_write=dsa.index_cache_write_ref,
    indexer_topk=dsa.indexer_topk_ref,
    sparse_mla=dsa.sparse_mla_ref,
)


def triton_ops() -> Ops:
    """The Triton kernels (FP8 GEMM, FP8 grouped-GEMM experts, DSA), imported only when asked for,
    so that importing glm5c never needs triton. Routing stays the reference."""
    from . import dsa_triton, fp8_triton, moe_triton

    return Ops(
        linear=fp8_triton.linear,
        route=moe.route_ref,
        experts=moe_triton.experts,
        index_cache_write=dsa_triton.index_cache_write,
        indexer_topk=dsa_triton.indexer_topk,
        sparse_mla=dsa_triton.sparse_mla,
    )
