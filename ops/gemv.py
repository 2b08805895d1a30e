"""Matrix-vector products for a CPU's compiled graphs.

A BF16 GEMM library call on a CPU (oneDNN through aten::mm) costs ~15-20 us before it reads
anything (bench/results/2026-11-30-cpu-gemv.md): more than reading a 512x512 weight takes. For one
or two rows, `gemv` writes x @ W.T as a multiply and a sum over `in` in fp32, which Inductor emits
as one vectorised reduction loop, fused with whatever produces x or picks W (an indexed load for
the experts). Run eagerly that expression would materialise the whole fp32 product, so outside a
compiler trace the same product runs as a GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weight[..., out, in].T -> [..., out], leading dims broadcasting (weight [out, in]
    for a linear layer; [P, out, in] gives each of P rows of x its own matrix); fp32 accumulation,
    the result in x's dtype."""
    if torch.compiler.is_compiling():
        return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
    if weight.dim() == 2:
        return F.linear(x, weight)
    return torch.matmul(weight, x.unsqueeze(-1)).squeeze(-1)
