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

from . import dsa, fp8, moe


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


# A CPU's BF16 graphs' linears, experts and attention; importing them registers the custom ops those
# graphs call (glm5c::linear_bf16_cpu, glm5c::moe_experts_cpu, glm5c::sparse_mla_cpu), which must
# exist before a runner loads them.
from . import dsa_cpu, moe_cpu  # noqa: E402
from .cpu_linear import linear_cpu  # noqa: E402
from .gemv import gemv  # noqa: E402, F401 (glm5c.ops.gemv)


@dataclass(frozen=True)
class Ops:
    linear: Callable[..., Tensor]
    route: Callable[..., tuple[Tensor, Tensor]]
    experts: Callable[..., Tensor]
    index_cache_write: Callable[..., None]
    indexer_topk: Callable[..., Tensor]
    sparse_mla: Callable[..., Tensor]
    # the expert stacks (gate, up, down) in the layout `experts` runs fastest, applied once at load
    # (weights.build_model); None: as loaded, [E, out, in]
    pack_experts: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    # a linear layer's weight [out, in] (or MLA's absorbed per-head [H, out, in]) in the layout
    # `linear` runs fastest, at load; None: as loaded
    pack_linear: Callable[[Tensor], Tensor] | None = None
    # linear layers reading the same x at once: (x, [(weight, scale_inv), ...]) -> [y, ...];
    # None: `linear` each
    linear_many: Callable[[Tensor, list[tuple[Tensor, Tensor | None]]], list[Tensor]] | None = None
    # the routed experts and the shared expert in one call: experts' arguments, then the shared
    # expert's (gate, up, down) weights and their scales -> routed + shared; None: `experts`, then
    # the shared MLP
    experts_shared: Callable[..., Tensor] | None = None
    # whether a compiled graph branches (torch.cond) around the indexer's queries and scores in a
    # step where no token sees more than index_topk keys (each then selects all it sees): a CPU's
    # graphs; not CUDA graphs, whose branch would need the host
    indexer_skips_short: bool = False


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
