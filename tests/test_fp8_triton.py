"""ops/fp8_triton.py under Triton's interpreter: activation quantization and the e4m3 rounding
bit for bit against torch, the block-scaled FP8 GEMM and `linear` against the fp32 references,
and a compile of the kernels for sm_90 (no GPU needed).

Error bound for the GEMM. With identical fp8 inputs and scales, kernel and reference differ only
in fp32 rounding: each output is a sum over K of products scaled per 128-block, so
|got - exact| <= (K + 4) * 2^-24 * sum_k |a_k b_k| (recursive-summation bound; +4 for the scale
products), checked against an exact float64 product. A bf16 output adds one bf16 ulp,
2^-7 |exact|: the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest, half that).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm5c.ops import fp8, fp8_triton

from .triton_sm90 import compile_for_sm90

pytestmark = pytest.mark.skipif(not fp8_triton.INTERPRET, reason="runs under TRITON_INTERPRET=1 (tests/conftest.py)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes, an all-zero group, tiny values (subnormal after scaling)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-12, 12, (m, 1), generator=g).float())
    x[0, :128] = 0.0
    if m > 1:
        x[1, ::7] *= 1e-6
    return x


@pytest.mark.parametrize("shape", [(1, 128), (5, 300), (3, 64), (17, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_is_bit_exact(shape, dtype):
    x = _activations(*shape, seed=shape[1]).to(dtype)
    q, s = fp8_triton.quantize_act(x)
    want_q, want_s = fp8.quantize_act_groups(x)
    assert q.dtype == fp8.FP8_DTYPE and s.shape == want_s.shape
    assert torch.equal(_bits(s), _bits(want_s))
    assert torch.equal(_bits(q), _bits(want_q))


def test_quantize_rounds_like_torch():
    """Every e4m3 value, the ties between neighbours, values 2^-10 either side of them, signed
    zeros and subnormals, each placed beside a 448 so the group's scale is exactly 1: the kernel's
    fp32 rounding (round_to_e4m3) gives torch's bytes."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes[(codes & 0x7F) != 0x7F].view(fp8.FP8_DTYPE).float().unique()  # finite, sorted
    ties = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, ties, ties * (1 + 2.0**-10), ties * (1 - 2.0**-10), torch.tensor([-0.0, 2.0**-30])])
    x = F.pad(x, (0, -x.numel() % 127)).view(-1, 127)
    x = torch.cat([torch.full((x.shape[0], 1), fp8.FP8_MAX), x], dim=1)  # [rows, 128]
    q, s = fp8_triton.quantize_act(x)
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(_bits(q), _bits(x.to(fp8.FP8_DTYPE)))


def _quantized_operands(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a, a_s = fp8.quantize_act_groups(torch.randn(m, k, generator=g))
    b, b_s = fp8.quantize_weight_blocks(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    return a, a_s, b, b_s


def _exact(a, a_s, b, b_s) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 product of the dequantized operands, and sum |a_k b_k| for the rounding bound."""
    ad = fp8.dequantize_act_groups(a, a_s).double()
    bd = fp8.dequantize_weight_blocks(b, b_s, torch.float64)
    return ad @ bd.T, ad.abs() @ bd.abs().T


@pytest.mark.parametrize("mnk", [(1, 64, 128), (5, 200, 300), (33, 130, 256), (17, 256, 384), (2, 3, 40)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_within_fp32_rounding(mnk, out_dtype):
    m, n, k = mnk
    a, a_s, b, b_s = _quantized_operands(m, n, k, seed=m + n + k)
    got = fp8_triton.fp8_gemm(a, a_s, b, b_s, out_dtype)
    exact, abs_sum = _exact(a, a_s, b, b_s)
    bound = (k + 4) * 2.0**-24 * abs_sum + (2.0**-7 * exact.abs() if out_dtype == torch.bfloat16 else 0)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("shape", [(2, 3, 256), (7, 300), (1, 64)])
def test_linear_matches_reference(shape):
    """Same quantized bytes as fp8.fp8_linear, so only fp32 rounding differs (twice the bound)."""
    g = torch.Generator().manual_seed(len(shape))
    k, n = shape[-1], 192
    x = torch.randn(*shape, generator=g)
    w, s = fp8.quantize_weight_blocks(torch.randn(n, k, generator=g) * 0.05)
    got = fp8_triton.linear(x, w, s)
    want = fp8.fp8_linear(x, w, s)
    assert got.shape == (*shape[:-1], n) and got.dtype == x.dtype
    _, abs_sum = _exact(*fp8.quantize_act_groups(x.reshape(-1, k)), w, s)
    assert ((got - want).reshape(-1, n).abs().double() <= 2 * (k + 4) * 2.0**-24 * abs_sum).all()
    plain = torch.randn(n, k, generator=g)
    assert torch.equal(fp8_triton.linear(x, plain), F.linear(x, plain))


def test_linear_rejects_mismatched_operands():
    w, s = fp8.quantize_weight_blocks(torch.randn(64, 128))
    with pytest.raises(ValueError, match="does not fit"):
        fp8_triton.linear(torch.randn(2, 100), w, s)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fp8_triton.fp8_gemm(*fp8.quantize_act_groups(torch.randn(2, 128)), w, s[:, :0], torch.float32)


def _gemm_job(bm: int, bn: int, warps: int, stages: int) -> dict:
    constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "EVEN_K": True}
    signature = {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "b_ptr": "*fp8e4nv", "b_scale_ptr": "*fp32",
                 "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32"}  # fmt: skip
    signature |= {name: "constexpr" for name in constexprs}
    return {"module": "glm5c.ops.fp8_triton", "kernel": "_fp8_gemm_kernel", "signature": signature,
            "constexprs": constexprs, "options": {"num_warps": warps, "num_stages": stages},
            "divisible": ["a_ptr", "a_scale_ptr", "b_ptr", "b_scale_ptr", "c_ptr", "N", "K"]}  # fmt: skip


def test_kernels_compile_for_sm90():
    """Prefill tiles use fp8 wgmma (e4m3 x e4m3 -> f32); decode tiles (16 rows, below wgmma's
    64) get mma.sync; both pipeline their loads through shared memory (cp.async, 2+ stages);
    the quantization kernel builds."""
    quant = {"module": "glm5c.ops.fp8_triton", "kernel": "_quantize_kernel",
             "signature": {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32",
                           "GROUPS": "constexpr", "GROUP": "constexpr"},
             "constexprs": {"GROUPS": 4, "GROUP": 128}}  # fmt: skip
    try:
        prefill, decode, q = compile_for_sm90([_gemm_job(128, 128, 8, 3), _gemm_job(16, 64, 4, 5), quant])
    except (RuntimeError, OSError) as e:
        pytest.skip(f"cannot compile for sm_90 here: {e}")
    for result in (prefill, decode, q):
        assert "error" not in result, result.get("error")
        assert result["cubin_bytes"] > 0
    assert any(i.startswith("wgmma.mma_async") and "e4m3.e4m3" in i for i in prefill["mma"]), prefill["mma"]
    assert decode["mma"], "the decode tile has no tensor-core instruction"
    for result, stage_bytes in ((prefill, 2 * 128 * 128), (decode, (16 + 64) * 128)):  # A + B tiles, fp8
        assert result["cp_async"] and result["shared_bytes"] >= 2 * stage_bytes  # loads pipelined
