"""The CPU graphs' small-GEMM kernel (ops/cpu/bf16_kernels.cpp: glm5c_linear_bf16, through
ops/cpu_linear.py) against torch's BF16 linear: plain and per-head weights, both dot-product paths,
row counts across its 8-row chunks, compiled graphs, the choice by rows, bad input, no compiler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glm5c.ops as ops
from glm5c.ops import cpu_kernels, cpu_linear


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to torch's BF16 result but for the summation order: within a bf16 ulp or two."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    if want.numel():
        assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    lib = cpu_kernels.open_library(cpu_kernels.build(cache=tmp_path_factory.mktemp("kernels"),
                                                     extra_flags=("-mno-avx512f",)))  # fmt: skip
    assert lib.glm5c_has_avx512bf16() == 0
    return lib


@pytest.mark.parametrize("rows", [0, 1, 5, 8, 9, 16, 40])
def test_kernel_matches_torch(rows, monkeypatch, request):
    x, w = _bf16(rows, 200, seed=rows), _bf16(72, 200, seed=100 + rows)  # 200: not a multiple of 32 (tails)
    _close(cpu_linear.linear_bf16(x, w), F.linear(x, w))
    heads_x, heads_w = _bf16(rows, 3, 96, seed=rows), _bf16(3, 40, 96, seed=7)
    want = torch.bmm(heads_x.transpose(0, 1), heads_w.transpose(1, 2)).transpose(0, 1)
    _close(cpu_linear.linear_bf16(heads_x, heads_w), want)
    # an odd number of weight rows (the last pair has one), and x past L1 (tiles of x outer)
    wide_x, odd_w = _bf16(rows, 700, seed=rows), _bf16(37, 700, seed=3)
    _close(cpu_linear.linear_bf16(wide_x, odd_w), F.linear(wide_x, odd_w))
    if rows in (5, 16):  # the portable dot products too
        lib = request.getfixturevalue("portable_lib")
        monkeypatch.setattr(cpu_kernels, "_lib", lib)
        _close(cpu_linear.linear_bf16(x, w), F.linear(x, w))
        _close(cpu_linear.linear_bf16(heads_x, heads_w), want)


@pytest.mark.parametrize("rows", [1, 5, 9, 16])
def test_views_are_read_in_place(rows, monkeypatch, request):
    """MLA's absorbed projections as the model passes them: w_uk^T (a transposed view of kv_b_proj's
    weight: the x @ W form), w_uv (a split: rows strided by head) and q_nope (a split of q); a
    plain transposed weight, odd widths. Same results as torch, and nothing is copied first."""
    heads, nope, v, lat = 3, 37, 24, 70  # odd in_features for x @ W (its last pair is half)
    kv_b = _bf16(heads, nope + v, lat, seed=rows)
    w_uk, w_uv = kv_b.split([nope, v], dim=1)  # [H, nope, L], [H, v, L]
    q = _bf16(rows, heads, nope + 16, seed=rows + 1)
    q_nope = q[..., :nope]  # [T, H, nope], token stride H * (nope + 16)
    lat_x = _bf16(rows, heads, lat, seed=rows + 2)
    flat_w, flat_x = _bf16(45, 66, seed=3), _bf16(rows, 45, seed=4)
    cases = [(q_nope, w_uk.transpose(1, 2)), (lat_x, w_uv), (flat_x, flat_w.t())]
    for x, w in cases:
        assert cpu_linear.kernel_layout(x, w)[1].data_ptr() == w.data_ptr()  # in place, not a copy
    libs = [None] + ([request.getfixturevalue("portable_lib")] if rows in (5, 16) else [])
    for lib in libs:
        if lib is not None:
            monkeypatch.setattr(cpu_kernels, "_lib", lib)
        for x, w in cases:
            want = (torch.bmm(x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1) if w.dim() == 3
                    else F.linear(x, w))  # fmt: skip
            _close(cpu_linear.linear_bf16(x, w), want)


def test_linear_cpu_takes_gemv_then_the_kernel_then_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_linear, "gemv", lambda x, w: calls.append(("gemv", x.shape[0])) or F.linear(x, w))
    monkeypatch.setattr(torch.ops.glm5c, "linear_bf16_cpu", lambda x, w: calls.append(("kernel", x.shape[0]))
                        or (F.linear(x, w) if w.dim() == 2 else torch.einsum("thi,hoi->tho", x, w)))  # fmt: skip
    monkeypatch.setattr(ops, "linear_ref", lambda x, w, s=None: calls.append(("torch", x.shape[0])) or F.linear(x, w))
    w = _bf16(8, 16, seed=0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # in a graph
    for rows in (1, 2, 16, 512, 513):
        cpu_linear.linear_cpu(_bf16(rows, 16, seed=rows), w)
    cpu_linear.linear_cpu(torch.randn(4, 16), w.float())  # fp32: gemv up to 4 rows
    cpu_linear.linear_cpu(torch.randn(2, 4, 16), w.float())  # 8 rows, fp32: torch
    cpu_linear.linear_cpu(_bf16(2, 3, 16, seed=1), w)  # [.., in] rows flatten: 6 rows
    cpu_linear.linear_cpu(_bf16(300, 2, 16, seed=1), _bf16(2, 8, 16, seed=2))  # per-head: the kernel at any rows
    assert calls == [("gemv", 1), ("kernel", 2), ("kernel", 16), ("kernel", 512), ("torch", 513), ("gemv", 4),
                     ("torch", 2), ("kernel", 6), ("kernel", 300)]  # fmt: skip
    calls.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)  # eagerly: the LM head
    cpu_linear.linear_cpu(_bf16(1, 16, seed=1), w)
    cpu_linear.linear_cpu(torch.randn(1, 16), w.float())
    assert calls == [("kernel", 1), ("gemv", 1)]
    monkeypatch.undo()  # the real kernel: a step whose chunks want no logits has zero rows
    assert cpu_linear.linear_cpu(_bf16(0, 16, seed=1), w).shape == (0, 8)


def test_compiled_graph_equals_eager():
    x, w, heads_x, heads_w = _bf16(2, 6, 64, seed=1), _bf16(48, 64, seed=2), _bf16(12, 4, 32, seed=3), _bf16(4, 24, 32, seed=4)

    def f(x, heads_x):
        return cpu_linear.linear_cpu(x, w) * 2, cpu_linear.linear_cpu(heads_x, heads_w) + 1

    eager = f(x, heads_x)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(x, heads_x)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    _close(eager[0] / 2, F.linear(x, w))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"x torch.float32 \(5, 16\).*expected bf16"):
        cpu_linear.linear_bf16(torch.randn(5, 16), _bf16(8, 16, seed=0))
    with pytest.raises(ValueError, match=r"does not fit weight torch.bfloat16 \(8, 12\)"):
        cpu_linear.linear_bf16(_bf16(5, 16, seed=0), _bf16(8, 12, seed=0))
    with pytest.raises(ValueError, match=r"x \[T, H, in\] for weight \[H, out, in\]"):
        cpu_linear.linear_bf16(_bf16(5, 2, 16, seed=0), _bf16(3, 8, 16, seed=0))


def test_without_the_library_torch_runs(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    x, w, heads_x, heads_w = _bf16(6, 32, seed=1), _bf16(8, 32, seed=2), _bf16(6, 2, 32, seed=3), _bf16(2, 8, 32, seed=4)
    assert torch.equal(cpu_linear.linear_bf16(x, w), F.linear(x, w))
    assert torch.equal(cpu_linear.linear_bf16(heads_x, heads_w), ops.linear_ref(heads_x, heads_w))


# ---- blocked weights (pack_linear): the packed kernel -----------------------------------------

needs_bf16 = pytest.mark.skipif(not cpu_kernels.has_avx512_bf16(), reason="blocked weights need AVX512-BF16")


def test_block_weight_is_a_blocked_view_of_the_same_matrix():
    w = torch.arange(32 * 6, dtype=torch.float32).reshape(32, 6).bfloat16()
    b = cpu_kernels.block_weight(w)
    assert tuple(b.shape) == (2, 3, 16, 2) and b[1, 2, 5, 1] == w[16 + 5, 2 * 2 + 1]
    assert torch.equal(cpu_kernels.unblock_weight(b), w)
    stacked = torch.stack([w, w + 1])  # leading dims: an expert stack [E, N, K]
    assert torch.equal(cpu_kernels.block_weight(stacked)[1], cpu_kernels.block_weight(w + 1))
    with pytest.raises(ValueError, match=r"\(24, 6\) needs 2-byte elements, N a multiple of 16 and K even"):
        cpu_kernels.block_weight(w[:24])
    with pytest.raises(ValueError, match="torch.float32"):
        cpu_kernels.block_weight(w.float())


@needs_bf16
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 8, 9, 16, 17, 40, 300])
def test_packed_kernel_matches_torch(rows):
    """Every packed_tile size (1-16 rows of x, then groups of 16), K not a multiple of 32, strided x."""
    w = _bf16(80, 70, seed=1)
    packed = cpu_linear.pack_linear(w)
    assert packed.shape == (5, 35, 16, 2)
    x = _bf16(rows, 100, seed=2)[:, 10:80]  # rows 100 apart: read in place
    got = cpu_linear.linear_packed_bf16(x, packed)
    _close(got, F.linear(x, w))
    assert torch.equal(got, torch.ops.glm5c.linear_packed_cpu(x, packed))  # the native op: the same kernel
    assert torch.equal(cpu_linear.linear_cpu(x.reshape(rows, 1, 70), packed).reshape(rows, 80), got)


@needs_bf16
def test_packed_weights_in_a_compiled_graph_at_every_row_count():
    """A blocked weight takes the packed kernel at any rows (1 row: no gemv, which reads [out, in])."""
    w = _bf16(48, 64, seed=2)
    packed = cpu_linear.pack_linear(w)
    for rows in (1, 6, 600):
        x = _bf16(rows, 64, seed=rows)

        def f(x):
            return cpu_linear.linear_cpu(x, packed) * 2

        compiled = torch.compile(f, fullgraph=True, dynamic=False)(x)
        assert torch.equal(compiled, f(x))
        _close(compiled / 2, F.linear(x, w))


def test_pack_linear_leaves_weights_it_cannot_block(monkeypatch):
    for w in (_bf16(40, 64, seed=0), _bf16(48, 63, seed=0), torch.randn(48, 64), _bf16(2, 4, 48, 64, seed=0)):
        assert cpu_linear.pack_linear(w) is w  # 40 rows, odd K, fp32, 4-d
    assert cpu_linear.pack_linear(_bf16(4, 48, 64, seed=0)).shape == (4, 3, 32, 16, 2)  # per head
    monkeypatch.setattr(cpu_kernels, "has_avx512_bf16", lambda: False)
    w = _bf16(48, 64, seed=0)
    assert cpu_linear.pack_linear(w) is w


@needs_bf16
def test_packed_bad_input_is_named(portable_lib, monkeypatch):
    packed = cpu_linear.pack_linear(_bf16(48, 64, seed=0))
    with pytest.raises(ValueError, match=r"x torch.bfloat16 \(5, 60\).*does not fit blocked weight"):
        cpu_linear.linear_packed_bf16(_bf16(5, 60, seed=0), packed)
    with pytest.raises(ValueError, match=r"x torch.float32 \(5, 64\)"):
        cpu_linear.linear_packed_bf16(torch.randn(5, 64), packed)
    with pytest.raises((RuntimeError, ValueError), match="linear_packed_cpu: x .* does not fit blocked weight"):
        torch.ops.glm5c.linear_packed_cpu(_bf16(5, 62, seed=0), packed)
    monkeypatch.setattr(cpu_kernels, "_lib", portable_lib)  # a kernel without AVX512-BF16 refuses blocked weights
    with pytest.raises(RuntimeError, match="need the kernel built with AVX512-BF16"):
        cpu_linear.linear_packed_bf16(_bf16(5, 64, seed=0), packed)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 7, 16, 40])
def test_packed_per_head_weights_match_torch(rows):
    """MLA's absorbed projections, blocked per head: x [T, H, in] read in place from a split of q."""
    kv_b = _bf16(3, 48, 32, seed=5)  # [H, nope + v, L]: W_uk = [:, :16], W_uv = [:, 16:]
    w_uk_t, w_uv = kv_b[:, :16].transpose(1, 2).contiguous(), kv_b[:, 16:].contiguous()  # [3, 32, 16], [3, 32, 32]
    q = _bf16(rows, 3, 24, seed=6)
    q_nope = q[..., :16]  # a split: rows 72 apart, heads 24
    got = cpu_linear.linear_packed_bf16(q_nope, cpu_linear.pack_linear(w_uk_t))
    _close(got, ops.linear_ref(q_nope, w_uk_t))
    assert torch.equal(got, torch.ops.glm5c.linear_packed_cpu(q_nope, cpu_linear.pack_linear(w_uk_t)))
    latent = _bf16(rows, 3, 32, seed=7)
    _close(cpu_linear.linear_cpu(latent, cpu_linear.pack_linear(w_uv)), ops.linear_ref(latent, w_uv))
    with pytest.raises(ValueError, match=r"x \[T, H, in\] for \[H, out / 16, in / 2, 16, 2\]"):
        cpu_linear.linear_packed_bf16(_bf16(rows, 2, 16, seed=0), cpu_linear.pack_linear(w_uk_t))


@needs_bf16
@pytest.mark.parametrize("rows", [0, 1, 5, 16, 17, 40])
def test_linears_side_by_side_equal_each_alone(rows):
    """linear_many_cpu: blocked weights reading the same x in one call of the multi-weight kernel,
    each output the single-weight kernel's to the bit (threads split the weights' blocks together)."""
    x = _bf16(rows, 96, seed=1)
    weights = [(cpu_linear.pack_linear(_bf16(n, 96, seed=2 + n)), None) for n in (64, 16, 48, 160)]
    got = cpu_linear.linear_many_cpu(x, weights)
    assert len(got) == len(weights)
    for y, (w, _) in zip(got, weights):
        assert torch.equal(y, cpu_linear.linear_cpu(x, w))
    eager = cpu_linear.linear_packed_multi_bf16(x, [w for w, _ in weights])  # (through ctypes)
    assert all(torch.equal(a, b) for a, b in zip(eager, got))


@needs_bf16
def test_linears_side_by_side_in_a_compiled_graph():
    weights = [(cpu_linear.pack_linear(_bf16(n, 64, seed=n)), None) for n in (32, 16)]

    def layer(x):
        a, b = cpu_linear.linear_many_cpu(x, weights)
        return a.sum(-1) + b.sum(-1)

    x = _bf16(9, 64, seed=0)
    assert torch.equal(torch.compile(layer, fullgraph=True, dynamic=False)(x), layer(x))


def test_linears_side_by_side_fall_back_to_one_at_a_time():
    """Weights not all blocked (or with FP8 scales): linear_cpu each."""
    x, w = _bf16(5, 32, seed=0), _bf16(16, 32, seed=1)
    got = cpu_linear.linear_many_cpu(x, [(w, None), (cpu_linear.pack_linear(w), None)])
    assert all(torch.equal(y, cpu_linear.linear_cpu(x, w)) for y in got)


@needs_bf16
def test_linears_side_by_side_bad_input_is_named():
    x = _bf16(3, 64, seed=0)
    with pytest.raises(ValueError, match="linear_packed_multi_cpu: no weights"):
        cpu_linear.linear_packed_multi_bf16(x, [])
    with pytest.raises(ValueError, match="does not fit blocked weight"):
        cpu_linear.linear_packed_multi_bf16(x, [cpu_linear.pack_linear(_bf16(16, 32, seed=1))])
    with pytest.raises(RuntimeError, match=r"linear_packed_multi_cpu: x \[3, 64\] does not fit blocked weight"):
        torch.ops.glm5c.linear_packed_multi_cpu(x, [cpu_linear.pack_linear(_bf16(16, 32, seed=1))])
