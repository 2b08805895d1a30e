"""gemv, and the CPU graphs' linear where it takes gemv (up to four rows); the kernel it takes up to
16 rows: tests/test_cpu_linear.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glm5c.ops as ops
from glm5c.ops import cpu_linear, gemv, linear_cpu


@pytest.mark.parametrize("x_shape", [(1, 48), (2, 48), (3, 2, 48)])
def test_gemv_matches_linear(x_shape):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*x_shape, generator=g), torch.randn(24, 48, generator=g)
    assert torch.allclose(gemv(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_gemv_with_a_matrix_per_row():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 48, generator=g), torch.randn(5, 24, 48, generator=g)
    want = torch.stack([F.linear(x[i], w[i]) for i in range(5)])
    assert torch.allclose(gemv(x, w), want, atol=1e-5, rtol=1e-5)


def test_linear_cpu_picks_gemv_for_up_to_four_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_linear, "gemv", lambda x, w: calls.append(x.shape[:-1]) or F.linear(x, w))
    w = torch.randn(8, 16)
    for rows in (1, 4, 5):
        linear_cpu(torch.randn(rows, 16), w)
    linear_cpu(torch.randn(1, 16, dtype=torch.float64), torch.randn(256, 128, dtype=torch.float64)[:8, :16].contiguous())
    assert calls == [(1,), (4,), (1,)]
    with pytest.raises(ValueError, match="scale_inv shape"):  # an FP8 weight takes the block-scaled GEMM
        linear_cpu(torch.randn(1, 16), w.to(torch.float8_e4m3fn), torch.ones(3, 3))
    assert len(calls) == 3


def test_linear_cpu_compiled_bf16():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 256, generator=g).bfloat16(), torch.randn(64, 256, generator=g).bfloat16()
    got = torch.compile(linear_cpu, fullgraph=True)(x, w).float()
    want = F.linear(x.float(), w.float())
    assert (got - want).abs().max() <= 2**-7 * want.abs().max()


@pytest.mark.parametrize("tokens", [1, 4, 5])
def test_per_head_linear(tokens):
    """A weight [H, out, in] applies head h's matrix to x[:, h] (MLA's absorbed projections), in
    linear_ref and in linear_cpu (gemv for 1-4 tokens, eager and compiled)."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(tokens, 3, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    want = torch.stack([x[:, h] @ w[h].T for h in range(3)], dim=1)  # [T, H, out]
    for op in (ops.linear_ref, linear_cpu, torch.compile(linear_cpu, fullgraph=True, dynamic=False)):
        assert torch.allclose(op(x, w), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per-head linear"):
        ops.linear_ref(torch.randn(tokens, 4, 16), w)
