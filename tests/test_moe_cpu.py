"""The CPU experts kernel (ops/cpu/bf16_kernels.cpp through ops/moe_cpu.py) against experts_ref in
BF16: both dot-product paths (AVX512-BF16 where this CPU has it, and the portable one), token
counts across its 8-row chunks, skewed and empty experts, expert-parallel shards, compiled
graphs, bad input, and the torch fallback where no compiler exists."""

from __future__ import annotations

import pytest
import torch

from glm5c.ops import cpu_kernels, linear_ref, moe, moe_cpu

NO_SCALES = (None, None, None)


def _case(tokens: int, n_experts: int = 16, top_k: int = 4, hidden: int = 96, inter: int = 48, seed: int = 0):
    """BF16 inputs; hidden and inter are not multiples of 32, so the dot products' tails run too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(tokens)] or
                      [torch.zeros(0, top_k, dtype=torch.long)]).reshape(tokens, top_k)  # fmt: skip
    weights = torch.rand(tokens, top_k, generator=g)
    stacks = [(torch.randn(n_experts, *s, generator=g) * 0.1).bfloat16()
              for s in ((inter, hidden), (inter, hidden), (hidden, inter))]  # fmt: skip
    return x, ids, weights, *stacks


def _close_to_ref(got: torch.Tensor, x, ids, weights, gate, up, down, first_expert: int = 0) -> None:
    """Equal to experts_ref run in BF16 but for the dot products' summation order: within a few
    bf16 ulps of it, and as far from the fp32 result as experts_ref itself."""
    ref = moe.experts_ref(x, ids, weights, gate, up, down, NO_SCALES, first_expert, linear_ref).float()
    exact = moe.experts_ref(x.float(), ids, weights, gate.float(), up.float(), down.float(), NO_SCALES,
                            first_expert, linear_ref)  # fmt: skip
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    if x.shape[0] == 0:
        return
    scale = ref.abs().max().clamp_min(1e-6)
    assert (got.float() - ref).abs().max() <= 0.02 * scale
    assert (got.float() - exact).norm() <= 1.5 * (ref - exact).norm() + 1e-6


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    """The kernel built without AVX512-BF16 (the path a CPU without it compiles)."""
    path = cpu_kernels.build(cache=tmp_path_factory.mktemp("kernels"), extra_flags=("-mno-avx512f",))
    lib = cpu_kernels.open_library(path)
    assert lib.glm5c_has_avx512bf16() == 0
    return lib


@pytest.mark.parametrize("tokens", [0, 1, 2, 5, 16, 40, 130])
def test_kernel_matches_reference(tokens):
    case = _case(tokens)
    _close_to_ref(moe_cpu.experts_bf16(*case, 0), *case)


@pytest.mark.parametrize("tokens", [1, 16, 40])
def test_portable_path_matches_reference(tokens, portable_lib, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_lib", portable_lib)
    case = _case(tokens, seed=3)
    _close_to_ref(moe_cpu.experts_bf16(*case, 0), *case)


def test_skewed_repeated_and_empty_experts():
    x, ids, weights, *w = _case(37)
    ids[:, 0] = 5  # every token's first choice is expert 5: 37 rows, five 8-row chunks
    ids[:, 1:] %= 3  # experts 3..15 get nothing, and a token may pick an expert twice (the weights add)
    _close_to_ref(moe_cpu.experts_bf16(x, ids, weights, *w, 0), x, ids, weights, *w)
    # one expert's tokens past L1 (150 x 200 wide: the kernel walks tiles of 8 tokens outermost)
    x, ids, weights, *w = _case(150, hidden=200, inter=72, seed=2)
    ids[:, 0] = 5
    _close_to_ref(moe_cpu.experts_bf16(x, ids, weights, *w, 0), x, ids, weights, *w)


def test_expert_parallel_shards_sum_to_the_whole():
    """A rank holds experts [first, first + E_local); pairs for other ranks add 0."""
    x, ids, weights, *w = _case(9, n_experts=16)
    full = moe.experts_ref(x.float(), ids, weights, *(t.float() for t in w), NO_SCALES, 0, linear_ref)
    shards = [moe_cpu.experts_bf16(x, ids, weights, *(t[r * 4 : r * 4 + 4] for t in w), r * 4).float() for r in range(4)]
    for r, shard in enumerate(shards):
        _close_to_ref(shard.bfloat16(), x, ids, weights, *(t[r * 4 : r * 4 + 4] for t in w), r * 4)
    assert (sum(shards) - full).norm() <= 0.02 * full.norm()


def test_op_in_a_compiled_graph_equals_eager():
    x, ids, weights, *w = _case(6)

    def layer(x, ids, weights):
        return moe_cpu.experts(x, ids, weights, *w, NO_SCALES, 0, linear_ref) * 2

    eager = layer(x, ids, weights)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x, ids, weights)
    assert torch.equal(compiled, eager)


def test_bad_input_is_named():
    x, ids, weights, gate, up, down = _case(3)
    with pytest.raises(ValueError, match="x is torch.float32"):
        moe_cpu.experts_bf16(x.float(), ids, weights, gate, up, down, 0)
    with pytest.raises(ValueError, match="down_proj"):
        moe_cpu.experts_bf16(x, ids, weights, gate, up, down.transpose(1, 2), 0)
    with pytest.raises(ValueError, match="expert_ids"):
        moe_cpu.experts_bf16(x, ids.int(), weights, gate, up, down, 0)
    with pytest.raises(ValueError, match="keep_fp8=False"):
        moe_cpu.experts(x, ids, weights, gate, up, down, (torch.ones(1), None, None), 0, linear_ref)


def test_without_a_compiler_the_op_warns_once_and_runs_torch(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_unavailable", None)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("GLM5C_KERNEL_CACHE", "/nonexistent-cache")
    case = _case(5)
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found \(\$CXX=/nonexistent/g\+\+\)"):
        got = moe_cpu.experts_bf16(*case, 0)
    _close_to_ref(got, *case)
    assert cpu_kernels.load() is None and "no C++ compiler" in cpu_kernels._unavailable


def test_the_form_is_chosen_by_pairs_per_expert(monkeypatch):
    """moe_cpu.experts: in a trace experts_gathered while T x top_k <= E / 4 (mini: 1 token), then
    the kernel's op at any size (never torch's grouped GEMM). Eagerly never gathered."""
    calls = []
    monkeypatch.setattr(moe, "experts_gathered", lambda *a: calls.append("gathered") or a[0])
    monkeypatch.setattr(moe, "experts_grouped_mm", lambda *a: calls.append("grouped") or a[0])
    monkeypatch.setattr(torch.ops.glm5c, "moe_experts_cpu", lambda *a: calls.append("kernel") or a[0])

    def choices(compiling: bool) -> list[str]:
        calls.clear()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        for tokens in (1, 2, 128, 1024):  # top-4 of 16 experts: 4 pairs <= 16 / 4, then 8 and more
            x, ids, weights, *w = _case(tokens)
            moe_cpu.experts(x, ids, weights, *w, NO_SCALES, 0, linear_ref)
        return list(calls)

    assert choices(compiling=True) == ["gathered", "kernel", "kernel", "kernel"]
    assert choices(compiling=False) == ["kernel", "kernel", "kernel", "kernel"]


def test_without_the_torch_ops_library_the_kernels_run_through_python(monkeypatch):
    """A toolchain that builds the C kernels but not bf16_ops.cpp (torch's headers): warned once,
    and the ops' Python implementations call the kernels."""
    build = cpu_kernels.build

    def no_ops_build(*args, name: str = "kernels", **kwargs):
        if name == "ops":
            raise cpu_kernels.CpuKernelBuildError("torch headers missing (simulated)")
        return build(*args, name=name, **kwargs)

    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_unavailable", None)
    monkeypatch.setattr(cpu_kernels, "_ops_loaded", False)
    monkeypatch.setattr(cpu_kernels, "build", no_ops_build)
    with pytest.warns(RuntimeWarning, match=r"torch ops .* unavailable, calling the kernels through Python: .*simulated"):
        assert cpu_kernels.load() is not None
    assert "simulated" in cpu_kernels._ops_loaded
    case = _case(5)
    _close_to_ref(moe_cpu.experts_bf16(*case, 0), *case)


# ---- blocked stacks (pack_experts): the packed kernel ----------------------------------------

needs_bf16 = pytest.mark.skipif(not cpu_kernels.has_avx512_bf16(), reason="blocked stacks need AVX512-BF16")


def _packed(case):
    x, ids, weights, gate, up, down = case
    packed = moe_cpu.pack_experts(gate, up, down)
    assert all(w.dim() == 5 for w in packed)
    return x, ids, weights, *packed


@needs_bf16
@pytest.mark.parametrize("tokens", [0, 1, 2, 3, 5, 9, 16, 17, 40, 130])
def test_packed_kernel_matches_reference(tokens):
    """Every packed_tile size (1-16 rows of x, and groups of 16 past it), against experts_ref."""
    case = _case(tokens)
    got = moe_cpu.experts_packed_bf16(*_packed(case), 0)
    _close_to_ref(got, *case)
    assert torch.equal(got, torch.ops.glm5c.moe_experts_packed_cpu(*_packed(case), 0))  # the native op: the same kernel


def _packed_at_threads(packed, threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return moe_cpu.experts_packed_bf16(*packed, 0)
    finally:
        torch.set_num_threads(before)


@needs_bf16
@pytest.mark.parametrize("tokens", [1, 2, 4, 16])
def test_packed_threads_take_whole_experts_at_decode_sizes(tokens):
    """At most 16 rows per chosen expert: two threads take whole experts (one thread splits blocks),
    to the bit the same result (each token's experts summed in expert order either way), so a
    token's output does not depend on which thread ran its experts, i.e. on the rest of the batch."""
    case = _case(tokens)
    packed = _packed(case)
    two = _packed_at_threads(packed, 2)
    assert torch.equal(two, _packed_at_threads(packed, 1))
    _close_to_ref(two, *case)
    x, ids, weights, *_ = case
    alone = _packed_at_threads((x[-1:], ids[-1:], weights[-1:], *packed[3:]), 2)
    assert torch.equal(alone, two[-1:])


@needs_bf16
def test_packed_threads_split_blocks_past_16_rows_an_expert():
    """An expert with 17 rows: threads split every expert's blocks, as one thread's result exactly."""
    x, ids, weights, *w = _case(17)
    ids[:, 0] = 2
    packed = _packed((x, ids, weights, *w))
    assert torch.equal(_packed_at_threads(packed, 2), _packed_at_threads(packed, 1))


@needs_bf16
def test_packed_skewed_repeated_empty_experts_and_shards():
    x, ids, weights, *w = _case(37)
    ids[:, 0] = 5  # 37 rows for expert 5 (three groups of 16), experts 3..15 otherwise empty, repeats add
    ids[:, 1:] %= 3
    _close_to_ref(moe_cpu.experts_packed_bf16(*_packed((x, ids, weights, *w)), 0), x, ids, weights, *w)
    x, ids, weights, *w = _case(9, n_experts=16)
    full = moe.experts_ref(x.float(), ids, weights, *(t.float() for t in w), NO_SCALES, 0, linear_ref)
    shards = []
    for r in range(4):
        local = [t[r * 4 : r * 4 + 4] for t in w]
        shards.append(moe_cpu.experts_packed_bf16(*_packed((x, ids, weights, *local)), r * 4).float())
        _close_to_ref(shards[-1].bfloat16(), x, ids, weights, *local, r * 4)
    assert (sum(shards) - full).norm() <= 0.02 * full.norm()


@needs_bf16
def test_packed_stacks_in_a_compiled_graph_take_the_packed_op_at_every_size():
    for tokens in (1, 6):  # 1 token: plain stacks would take Inductor's gathered loops here
        case = _case(tokens)
        x, ids, weights, *w = _packed(case)

        def layer(x, ids, weights):
            return moe_cpu.experts(x, ids, weights, *w, NO_SCALES, 0, linear_ref) * 2

        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x, ids, weights)
        assert torch.equal(compiled, layer(x, ids, weights))
        _close_to_ref((compiled.float() / 2).bfloat16(), *case)


def test_pack_experts_leaves_stacks_it_cannot_block(monkeypatch):
    _, _, _, *w = _case(1, inter=40)  # 40 rows: not whole blocks of 16
    assert all(a is b for a, b in zip(moe_cpu.pack_experts(*w), w))
    _, _, _, *w = _case(1)
    monkeypatch.setattr(cpu_kernels, "has_avx512_bf16", lambda: False)  # the portable kernel takes [E, N, K] only
    assert all(a is b for a, b in zip(moe_cpu.pack_experts(*w), w))


@needs_bf16
def test_packed_bad_input_is_named(portable_lib, monkeypatch):
    x, ids, weights, gate, up, down = _packed(_case(3))
    with pytest.raises(ValueError, match=r"shapes do not fit.*blocked"):
        moe_cpu.experts_packed_bf16(x, ids, weights, gate, up, down[:, :, :-1], 0)
    with pytest.raises(ValueError, match="x is torch.float32"):
        moe_cpu.experts_packed_bf16(x.float(), ids, weights, gate, up, down, 0)
    with pytest.raises((RuntimeError, ValueError), match="moe_experts_packed_cpu: shapes do not fit"):
        torch.ops.glm5c.moe_experts_packed_cpu(x, ids, weights, up[:, :-1], up, down, 0)
    monkeypatch.setattr(cpu_kernels, "_lib", portable_lib)  # a kernel without AVX512-BF16 refuses blocked stacks
    with pytest.raises(RuntimeError, match="need the kernel built with AVX512-BF16"):
        moe_cpu.experts_packed_bf16(x, ids, weights, gate, up, down, 0)
    assert portable_lib.glm5c_moe_experts_packed_bf16(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), gate.data_ptr(),
                                                      up.data_ptr(), down.data_ptr(), x.data_ptr(), 3, 4, 96, 48, 16, 0, 1) == 3


# ---- a shared expert in the packed kernel's call (moe_cpu.experts_shared) --------------------


def _shared(hidden: int = 96, inter: int = 48, seed: int = 1):
    """A shared expert's gate, up [I, D] and down [D, I] (plain), and blocked as pack_linear leaves them."""
    g = torch.Generator().manual_seed(seed)
    plain = [(torch.randn(*s, generator=g) * 0.1).bfloat16() for s in ((inter, hidden), (inter, hidden), (hidden, inter))]
    return plain, [cpu_kernels.block_weight(w) for w in plain]


def _alone(x, weights_blocked):
    """The shared expert through the packed kernel alone: one expert every token chose with weight 1
    (bf16(1 * bf16(row)) is the row), so exactly the kernel's own shared rows."""
    ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    one = torch.ones(x.shape[0], 1)
    return moe_cpu.experts_packed_bf16(x, ids, one, *(w.unsqueeze(0) for w in weights_blocked), 0)


@needs_bf16
@pytest.mark.parametrize("tokens", [0, 1, 3, 16, 17, 40])
def test_shared_expert_in_the_packed_call_adds_in_bf16(tokens):
    """routed + shared, added in bf16 as MoE.forward adds them: to the bit the routed call plus the
    shared expert run alone (threads taking whole experts up to 16 tokens, splitting blocks past),
    and close to the MLP in torch (F.linear, silu) plus experts_ref."""
    case = _case(tokens)
    packed = _packed(case)
    plain, blocked = _shared()
    got = moe_cpu.experts_shared_packed_bf16(*packed, *blocked, 0)
    assert torch.equal(got, torch.ops.glm5c.moe_experts_shared_packed_cpu(*packed, *blocked, 0))
    x = case[0]
    assert torch.equal(got, (moe_cpu.experts_packed_bf16(*packed, 0).float() + _alone(x, blocked).float()).bfloat16())
    if tokens:
        g, u, d = plain
        F = torch.nn.functional
        ref = moe.experts_ref(*case, NO_SCALES, 0, linear_ref) + F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        assert (got.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()
    if 0 < tokens <= 16:  # one thread splits blocks: the same result, and a token's does not depend on its batch
        assert torch.equal(got, _packed_at_threads_shared(packed, blocked, 1))
        alone = moe_cpu.experts_shared_packed_bf16(x[-1:], case[1][-1:], case[2][-1:], *packed[3:], *blocked, 0)
        assert torch.equal(alone, got[-1:])


def _packed_at_threads_shared(packed, blocked, threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return moe_cpu.experts_shared_packed_bf16(*packed, *blocked, 0)
    finally:
        torch.set_num_threads(before)


@needs_bf16
def test_experts_shared_takes_the_fused_op_where_it_fits():
    """Ops.experts_shared: the fused op over blocked stacks and a shared expert of their size (in a
    compiled graph too); otherwise the routed experts, then the shared MLP through `linear`."""
    case = _case(6)
    x, ids, weights, *stacks = _packed(case)
    plain, blocked = _shared()

    def layer(x, ids, weights):
        return moe_cpu.experts_shared(x, ids, weights, *stacks, NO_SCALES, 0, linear_ref, tuple(blocked), NO_SCALES)

    fused = moe_cpu.experts_shared_packed_bf16(x, ids, weights, *stacks, *blocked, 0)
    assert torch.equal(layer(x, ids, weights), fused)
    assert torch.equal(torch.compile(layer, fullgraph=True, dynamic=False)(x, ids, weights), fused)
    # a shared expert of another size (two of them, as n_shared_experts = 2 gives): routed, then the MLP
    wide_plain, _ = _shared(inter=96)
    got = moe_cpu.experts_shared(*_packed(case), NO_SCALES, 0, linear_ref, tuple(wide_plain), NO_SCALES)
    g, u, d = wide_plain
    F = torch.nn.functional
    want = moe_cpu.experts_packed_bf16(*_packed(case), 0) + F.linear(F.silu(F.linear(case[0], g)) * F.linear(case[0], u), d)
    assert torch.equal(got, want)


@needs_bf16
def test_shared_bad_input_is_named():
    x, ids, weights, *stacks = _packed(_case(3))
    _, blocked = _shared()
    with pytest.raises(ValueError, match="shared expert's gate .* are not one expert of gate_proj"):
        moe_cpu.experts_shared_packed_bf16(x, ids, weights, *stacks, blocked[0], blocked[1], blocked[0], 0)
    with pytest.raises(ValueError, match="shared_up is torch.float32"):
        moe_cpu.experts_shared_packed_bf16(x, ids, weights, *stacks, blocked[0], blocked[1].float(), blocked[2], 0)
    with pytest.raises(RuntimeError, match="moe_experts_shared_packed_cpu: shapes do not fit"):
        torch.ops.glm5c.moe_experts_shared_packed_cpu(x, ids, weights, *stacks, blocked[0], blocked[1], blocked[0], 0)


# ---- the router kernel ---------------------------------------------------------------------

def _route_case(tokens: int, n_experts: int = 16, hidden: int = 72, seed: int = 0):
    """hidden not a multiple of 16, so the dot products' tails run too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    return x, torch.randn(n_experts, hidden, generator=g) * 0.2, torch.randn(n_experts, generator=g) * 0.3


ROUTINGS = [  # (n_experts, top_k, n_group, topk_group, norm_topk_prob)
    (16, 4, 4, 2, True),  # mini's
    (16, 4, 1, 1, False),
    (32, 8, 8, 3, True),
    (6, 3, 1, 1, True),  # the tiny test configs'
]


@pytest.mark.parametrize("tokens", [0, 1, 16, 70])  # threads split the tokens from 64
@pytest.mark.parametrize("routing", ROUTINGS)
def test_route_kernel_matches_reference(tokens, routing):
    n_experts, top_k, n_group, topk_group, norm = routing
    x, gate, bias = _route_case(tokens, n_experts)
    want_w, want_ids = moe.route_ref(x, gate, bias, top_k, n_group, topk_group, norm, 2.5)
    got_w, got_ids = moe_cpu.route_bf16(x, gate, bias, top_k, n_group, topk_group, norm, 2.5)
    assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32 and got_ids.shape == (tokens, top_k)
    assert torch.equal(got_ids, want_ids)  # the same experts, best first
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_route_portable_path_matches_reference(portable_lib, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_lib", portable_lib)
    x, gate, bias = _route_case(20, 32, seed=4)
    want_w, want_ids = moe.route_ref(x, gate, bias, 8, 8, 3, True, 1.5)
    got_w, got_ids = moe_cpu.route_bf16(x, gate, bias, 8, 8, 3, True, 1.5)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_route_of_a_token_does_not_depend_on_its_batch():
    x, gate, bias = _route_case(70, seed=5)
    together = moe_cpu.route_bf16(x, gate, bias, 4, 4, 2, True, 2.5)
    for t in (0, 31, 69):
        alone = moe_cpu.route_bf16(x[t : t + 1], gate, bias, 4, 4, 2, True, 2.5)
        assert torch.equal(alone[0], together[0][t : t + 1]) and torch.equal(alone[1], together[1][t : t + 1])


def test_route_ties_go_to_the_lower_group_and_expert():
    """All scores equal (x = 0): groups 0 and 1 stay eligible, and experts 0..3 are chosen, weighted equally."""
    x, gate, bias = torch.zeros(3, 32, dtype=torch.bfloat16), torch.randn(16, 32), torch.zeros(16)
    weights, ids = moe_cpu.route_bf16(x, gate, bias, 4, 4, 2, True, 2.0)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(weights, torch.full((3, 4), 0.5))
    bias[13] = 1.0  # a biased expert in group 3 lifts that group and is chosen first, weighted by its unbiased score
    weights, ids = moe_cpu.route_bf16(x, gate, bias, 4, 4, 2, False, 1.0)
    assert ids.tolist() == [[13, 0, 1, 2]] * 3 and torch.equal(weights, torch.full((3, 4), 0.5))


def test_route_in_a_compiled_graph_is_the_op():
    x, gate, bias = _route_case(16)

    def route(x):
        weights, ids = moe_cpu.route(x, gate, bias, 4, 4, 2, True, 2.5)
        return weights * 2, ids

    eager = route(x)
    compiled = torch.compile(route, fullgraph=True, dynamic=False)(x)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    # other dtypes take the reference
    w, ids = moe_cpu.route(x.float(), gate, bias, 4, 4, 2, True, 2.5)
    assert torch.equal(ids, moe.route_ref(x.float(), gate, bias, 4, 4, 2, True, 2.5)[1])


def test_route_bad_input_is_named():
    x, gate, bias = _route_case(3)
    with pytest.raises(ValueError, match="route_cpu: x is torch.float32"):
        moe_cpu.route_bf16(x.float(), gate, bias, 4, 4, 2, True, 2.5)
    with pytest.raises(ValueError, match="route_cpu: shapes do not fit"):
        moe_cpu.route_bf16(x, gate[:, :70], bias, 4, 4, 2, True, 2.5)
    with pytest.raises(ValueError, match="top_k 9, n_group 4, topk_group 2 do not fit 16 experts"):
        moe_cpu.route_bf16(x, gate, bias, 9, 4, 2, True, 2.5)  # 2 groups of 4 hold 8
    with pytest.raises(ValueError, match="do not fit 16 experts"):
        moe_cpu.route_bf16(x, gate, bias, 4, 3, 2, True, 2.5)  # 16 experts do not split into 3 groups


def test_route_without_a_compiler_runs_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    x, gate, bias = _route_case(5)
    got = moe_cpu.route_bf16(x, gate, bias, 4, 4, 2, True, 2.5)
    want = moe.route_ref(x, gate, bias, 4, 4, 2, True, 2.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
