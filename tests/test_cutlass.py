"""The CUTLASS FP8 grouped-GEMM path: ops/cutlass/grouped_gemm_fp8.cu, its build and ops/cutlass_moe.py.

On the CPU machine (no GPU):
- build: the .cu compiles for sm_90a with the local nvcc (slow, ~1 minute on 2 cores; skipped
  without nvcc or the nvidia-cutlass headers), and its SASS holds FP8 wgmma (QGMMA ... E4M3)
  in both kernel configurations, with no register spills; the shared library, linked from that
  object, loads through ctypes, answers workspace queries, rejects misaligned shapes, and fails
  cleanly (an error code, no crash) when launched without a GPU. Missing nvcc / headers / library
  give clear errors.
- the Python path under Triton's interpreter, with the GEMM op's CPU implementation (the torch
  reference of the kernel's contract): each stage against float64 math on its own inputs, the
  whole op bit-equal to those stages, within 1e-2 (Frobenius) of `_emulated` (experts_ref's math
  with this path's roundings) and within 6e-2 of moe.experts_ref.

On a GPU (marked `gpu`; run with TRITON_INTERPRET=0, as tools/device_check.py does, since
tests/conftest.py defaults to the interpreter): each kernel configuration against the reference
GEMM per element, the whole op against `_emulated`, moe.experts_ref and the Triton path, and a
CUDA graph capture and replay bit-equal to eager calls.

Bounds. GEMM, per element, against float64 on the same fp8 operands: one bf16 rounding (2^-8
relative, with headroom for the reference's own) plus summation, 2 (K + 4) 2^-24 sum |a b| in
fp32 (the CPU reference), 2^-11 sum |a b| on the GPU, whose FP8 tensor cores add with ~14
mantissa bits within each 128-deep block (DeepSeek-V3's report; why the scales promote per block).
SwiGLU + quantization: as test_moe_triton's (|h - h_exact| <= 2^-4 |h_exact| + 2^-10 s + slack).
Whole op. The gate/up product is rounded to bf16 before SwiGLU here (as vLLM's and DeepSeek's
FP8 inference do), fp32 in experts_ref and the Triton path; near a rounding boundary an fp8
byte of h then flips, which moves an output by up to an fp8 step. Measured, relative Frobenius
error: against experts_ref 1.0-1.6e-2 for 9-64 tokens and 3.8e-2 for one token (few terms), the
same as `_emulated` itself shows against experts_ref (3.9e-2); against `_emulated` 3-4e-3
(summation order flips a few bytes). Bounds: 1e-2 against `_emulated`, 6e-2 against experts_ref
and the Triton path. A wrong expert, row, scale or pair is off by O(1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from glm5c.ops import cutlass_moe, fp8, fp8_triton, linear_ref, moe, moe_triton
from glm5c.ops.cutlass import build

INTERPRET = fp8_triton.INTERPRET
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 (tests/conftest.py)")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA GPU and compiled Triton kernels (run with TRITON_INTERPRET=0)",
)
REL_EMULATED, REL_REF = 1e-2, 6e-2


# ---------------------------------------------------------------------------------------------
# operands


def _stack(n: int, out: int, inn: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, out, inn] fp8 + [n, ceil(out/128), ceil(inn/128)] scales; rows of different magnitudes."""
    q = [fp8.quantize_weight_blocks(torch.randn(out, inn, generator=g) * torch.rand(out, 1, generator=g) * 0.2)
         for _ in range(n)]  # fmt: skip
    return torch.stack([w for w, _ in q]), torch.stack([s for _, s in q])


def _weights(n: int, d: int, i: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    (wg, sg), (wu, su), (wd, sd) = _stack(n, i, d, g), _stack(n, i, d, g), _stack(n, d, i, g)
    return [wg, wu, wd], (sg, su, sd)


def _routing(tokens: int, n_experts: int, top_k: int, case: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(tokens)])
    if case == "all_to_one_expert":
        ids = torch.full_like(ids, 5)  # every pair to expert 5 (top_k repeats of it)
    if case == "empty_experts":
        ids = ids % 4  # experts 4.. get nothing
    return ids, torch.rand(tokens, top_k, generator=g)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _emulated(x, ids, weights, w, scales, first_expert: int) -> torch.Tensor:
    """experts_ref's math (float64 here) with this path's roundings: fp8 activations, gate/up
    and the down output rounded to bf16, SwiGLU and its quantization from those -> [T, D] float64."""
    n_local, d = w[0].shape[0], x.shape[1]
    out = torch.zeros(x.shape[0], d, dtype=torch.float64)
    xq = fp8.dequantize_act_groups(*fp8.quantize_act_groups(x.cpu().float())).double()
    for e in range(n_local):
        token, slot = torch.where(ids.cpu() == first_expert + e)
        if token.numel() == 0:
            continue
        wg, wu, wd = (fp8.dequantize_weight_blocks(m[e].cpu(), s[e].cpu(), torch.float64) for m, s in zip(w, scales))
        gate, up = ((xq[token] @ m.T).to(torch.bfloat16).float() for m in (wg, wu))
        h = fp8.dequantize_act_groups(*fp8.quantize_act_groups(F.silu(gate) * up)).double()
        y = (h @ wd.T).to(torch.bfloat16).double()
        out.index_add_(0, token, y * weights.cpu().double()[token, slot, None])
    return out


def _check_whole_op(got, x, ids, weights, w, scales, first_expert: int) -> None:
    want = moe.experts_ref(x.cpu().float(), ids.cpu(), weights.cpu(), *(m.cpu() for m in w),
                           tuple(s.cpu() for s in scales), first_expert, linear_ref)  # fmt: skip
    emulated = _emulated(x, ids, weights, w, scales, first_expert)
    assert torch.isfinite(got).all()
    if want.norm() == 0:  # no local pairs (a shard)
        assert got.abs().max() == 0 and emulated.abs().max() == 0
        return
    assert _rel(got.cpu(), emulated) < REL_EMULATED
    assert _rel(got.cpu(), want) < REL_REF


def _gemm_bound_ok(got, a, a_s, w, w_s, group_ends, sets_w, tensor_cores: bool = False) -> None:
    """got [rows, sets*N] against float64 math on the same operands, per element (module docstring;
    tensor_cores: Hopper's FP8 MMA adds within each 128-deep block with ~14 mantissa bits, not
    fp32's 24, so the summation term is 2^-11 sum |a b| there)."""
    ad = fp8.dequantize_act_groups(a.cpu(), a_s.cpu()).double()
    start = 0
    n = w.shape[1]
    for e, end in enumerate(group_ends.tolist()):
        if end > start:
            for s, (ws, ss) in enumerate(sets_w):
                wd = fp8.dequantize_weight_blocks(ws[e].cpu(), ss[e].cpu(), torch.float64)
                exact = ad[start:end] @ wd.T
                mag = ad[start:end].abs() @ wd.abs().T
                k = ad.shape[1]
                summation = 2.0**-11 if tensor_cores else 2 * (k + 4) * 2.0**-24
                bound = 2.0**-8 * exact.abs() + summation * mag + 1e-30
                part = got[start:end, s * n : (s + 1) * n].cpu().double()
                worst = (part - exact).abs().max()
                assert ((part - exact).abs() <= bound).all(), f"expert {e} set {s}: max err {worst}"
        start = max(start, end)


# ---------------------------------------------------------------------------------------------
# the Python path on the CPU (the GEMM op runs its reference there)


def _stages(x, ids, weights, w, scales, first_expert: int, config: int) -> torch.Tensor:
    """Run cutlass_moe.experts' stages one by one, check each against float64 math on its own
    inputs, and return the combined output [T, D]."""
    (n_local, i, d), (t, k) = w[0].shape, ids.shape
    order, group_ends, _ = moe.group_by_expert(ids, first_expert, n_local)
    rows = int(group_ends[-1])
    token = order // k
    xq, xq_s = fp8_triton.quantize_act(x)
    xs = xq.view(torch.uint8)[token].view(fp8.FP8_DTYPE)
    xs_s = xq_s[token]
    gu = cutlass_moe.grouped_gemm_fp8(xs, xs_s, w[0], scales[0], w[1], scales[1], group_ends, config)
    assert gu.shape == (t * k, 2 * i) and gu.dtype == torch.bfloat16
    _gemm_bound_ok(gu, xs, xs_s, w[0], scales[0], group_ends, [(w[0], scales[0]), (w[1], scales[1])])

    h, hs = cutlass_moe.swiglu_quant(gu, group_ends)
    g_, u_ = gu[:rows, :i].double(), gu[:rows, i:].double()
    h_exact = F.silu(g_) * u_
    hd = fp8.dequantize_act_groups(h[:rows], hs[:rows]).double()
    s = hs[:rows].double().repeat_interleave(128, 1)[:, :i]
    slack = 1e-5 * h_exact.abs().amax(1, keepdim=True)
    assert ((hd - h_exact).abs() <= 2.0**-4 * h_exact.abs() + 2.0**-10 * s + slack).all()
    amax = F.pad(h_exact, (0, -i % 128)).view(rows, -1, 128).abs().amax(-1)
    assert ((hs[:rows] - amax / fp8.FP8_MAX).abs() <= 1e-5 * amax / fp8.FP8_MAX + 1e-30).all()

    y = cutlass_moe.grouped_gemm_fp8(h, hs, w[2], scales[2], None, None, group_ends, config)  # [P, D] sorted
    _gemm_bound_ok(y, h, hs, w[2], scales[2], group_ends, [(w[2], scales[2])])

    out = torch.empty(t, d, dtype=x.dtype)
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(t * k))
    moe_triton.combine(y, ids, weights, first_expert, n_local, out, row_of_pair)
    local = ((ids - first_expert) >= 0) & ((ids - first_expert) < n_local)  # [T, k]
    terms = y[row_of_pair].double().view(t, k, d) * (weights.double() * local)[:, :, None]
    rounding = 2.0**-7 * terms.sum(1).abs() if x.dtype != torch.float32 else 0  # the interpreter truncates to bf16
    bound = (k + 1) * 2.0**-24 * terms.abs().sum(1) + rounding
    assert ((out.double() - terms.sum(1)).abs() <= bound).all()
    return out


CASES = ["random", "all_to_one_expert", "empty_experts", "more_experts_than_tokens", "one_token"]


@needs_interpreter
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_match_reference(case, dtype):
    n_experts, top_k, d, i = 16, 4, 256, 128
    tokens = {"more_experts_than_tokens": 3, "one_token": 1}.get(case, 24)
    ids, weights = _routing(tokens, n_experts, top_k, case, seed=1)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    w, scales = _weights(n_experts, d, i, seed=3)
    cfg = cutlass_moe.choose_config(tokens * top_k, n_experts)
    got = cutlass_moe.experts(x, ids, weights, *w, scales, 0, linear_ref)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, _stages(x, ids, weights, w, scales, 0, cfg))
    _check_whole_op(got, x, ids, weights, w, scales, 0)


@needs_interpreter
def test_ragged_dims():
    """D and I multiples of 16 but not of 128: partial K blocks and N tiles, a partial last
    SwiGLU quantization group."""
    d, i = 208, 80
    ids, weights = _routing(13, 8, 3, "random", seed=4)
    x = torch.randn(13, d, generator=torch.Generator().manual_seed(5))
    w, scales = _weights(8, d, i, seed=6)
    got = cutlass_moe.experts(x, ids, weights, *w, scales, 0, linear_ref, config="tile128x128")
    assert torch.equal(got, _stages(x, ids, weights, w, scales, 0, cutlass_moe.CONFIGS["tile128x128"]))
    _check_whole_op(got, x, ids, weights, w, scales, 0)


@needs_interpreter
def test_expert_parallel_shards():
    """4 ranks with 4 of 16 experts each: each shard is the reference's for that shard (other
    ranks' pairs add zero, their rows are never computed), and the shards sum to the layer."""
    d, i = 128, 128
    ids, weights = _routing(9, 16, 4, "random", seed=7)
    x = torch.randn(9, d, generator=torch.Generator().manual_seed(8))
    w, scales = _weights(16, d, i, seed=9)
    shards = []
    for r in range(4):
        part = [t[4 * r : 4 * r + 4] for t in w]
        part_scales = tuple(s[4 * r : 4 * r + 4] for s in scales)
        got = cutlass_moe.experts(x, ids, weights, *part, part_scales, 4 * r, linear_ref)
        assert torch.equal(got, _stages(x, ids, weights, part, part_scales, 4 * r, 1))
        _check_whole_op(got, x, ids, weights, part, part_scales, 4 * r)
        shards.append(got)
    _check_whole_op(sum(shards), x, ids, weights, w, scales, 0)


@needs_interpreter
def test_zero_tokens_and_bad_inputs():
    w, scales = _weights(2, 128, 128, seed=0)
    ids, weights = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    assert cutlass_moe.experts(torch.zeros(0, 128), ids, weights, *w, scales, 0, linear_ref).shape == (0, 128)
    x, ids, weights = torch.randn(1, 128), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    with pytest.raises(ValueError, match="FP8 expert stacks only"):
        cutlass_moe.experts(x, ids, weights, *w, (scales[0], None, None), 0, linear_ref)
    with pytest.raises(ValueError, match="unknown CUTLASS config"):
        cutlass_moe.experts(x, ids, weights, *w, scales, 0, linear_ref, config="tile64")
    w2, scales2 = _weights(2, 200, 128, seed=0)  # hidden 200: not a multiple of 16
    with pytest.raises(ValueError, match="multiples of 16"):
        cutlass_moe.experts(torch.randn(1, 200), ids, weights, *w2, scales2, 0, linear_ref)


def test_op_schema_and_fake():
    """The custom op's fake implementation traces (opcheck: fake tensors, AOT dispatch; its
    schema test needs fp8 arithmetic, which CPU torch lacks), and its CPU reference computes
    the contract: rows past the last group untouched (zero there)."""
    g = torch.Generator().manual_seed(0)
    a, a_s = fp8.quantize_act_groups(torch.randn(10, 256, generator=g))
    w0, s0 = _stack(3, 128, 256, g)
    w1, s1 = _stack(3, 128, 256, g)
    ends = torch.tensor([4, 4, 9], dtype=torch.int32)
    for args in [(a, a_s, w0, s0, w1, s1, ends, 0), (a, a_s, w0, s0, None, None, ends, 1)]:
        tests = ("test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(cutlass_moe.grouped_gemm_fp8, args, test_utils=tests)
    out = cutlass_moe.grouped_gemm_fp8(a, a_s, w0, s0, w1, s1, ends, 0)
    assert out.shape == (10, 256) and out[9:].abs().sum() == 0  # rows past the last group: not written
    _gemm_bound_ok(out, a, a_s, w0, s0, ends, [(w0, s0), (w1, s1)])
    with pytest.raises(ValueError, match="multiple of 16"):
        cutlass_moe.grouped_gemm_fp8(a[:, :200], a_s, w0[:, :, :200], s0, None, None, ends, 0)


def test_choose_config():
    swap, tile = cutlass_moe.CONFIGS["swapab128x32"], cutlass_moe.CONFIGS["tile128x128"]
    assert [cutlass_moe.choose_config(t * 8, 256) for t in (1, 8, 64, 512, 4096)] == [swap, swap, swap, swap, tile]
    assert cutlass_moe.choose_config(8 * 40, 8) == tile  # 40 rows per expert


# ---------------------------------------------------------------------------------------------
# loading and building


def test_missing_library_gives_build_instructions(monkeypatch, tmp_path):
    monkeypatch.delenv(cutlass_moe.LIB_ENV, raising=False)
    monkeypatch.setenv("GLM5C_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cutlass_moe, "_lib", None)
    with pytest.raises(cutlass_moe.CutlassNotBuilt, match=r"python -m glm5c\.ops\.cutlass\.build"):
        cutlass_moe.load_library()
    monkeypatch.setenv(cutlass_moe.LIB_ENV, str(tmp_path / "nowhere.so"))
    with pytest.raises(cutlass_moe.CutlassNotBuilt, match="nowhere.so"):
        cutlass_moe.load_library()


def test_missing_toolchain_messages(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(build, "DEFAULT_CUDA_ROOT", str(tmp_path))
    with pytest.raises(build.CutlassBuildError, match="nvcc not found"):
        build.find_nvcc()
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(build.CutlassBuildError, match="pip install nvidia-cutlass"):
        build.cutlass_include_dirs()


def _toolchain_or_skip() -> None:
    try:
        build.find_nvcc()
        build.cutlass_include_dirs()
    except build.CutlassBuildError as e:
        pytest.skip(f"cannot build the CUTLASS kernels here: {e}")


@pytest.fixture(scope="module")
def sm90_object() -> Path:
    """The kernels' object file for sm_90a (cached by source, flags and nvcc version)."""
    _toolchain_or_skip()
    return build.build(compile_only=True, timeout=1200)


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", build.DEFAULT_CUDA_ROOT)) / "bin" / "cuobjdump"]
    try:  # Triton ships one
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def _functions(text: str) -> dict[str, str]:
    """cuobjdump output -> {function name: its section}."""
    parts = re.split(r"Function : (\S+)", text)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.slow
def test_kernels_compile_to_fp8_wgmma(sm90_object):
    """Both GEMM configurations hold FP8 wgmma in their SASS (QGMMA with E4M3 operands: 64x128
    atoms for the 128x128 tile, 64x32 for swap-AB), and no kernel spills to local memory."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the SASS")
    sass = _functions(subprocess.run([tool, "--dump-sass", str(sm90_object)], capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip
    gemms = {name: body for name, body in sass.items() if "GemmUniversal" in name}
    assert len(gemms) == 2 and sum("setup_groups" in name for name in sass) == 2, list(sass)
    atoms = set()
    for name, body in gemms.items():
        qgmma = re.findall(r"QGMMA\.(\d+x\d+x\d+)\.F32\.E4M3\.E4M3", body)
        assert qgmma, f"no FP8 wgmma in {name[:80]}"
        atoms |= set(qgmma)
    assert atoms == {"64x128x32", "64x32x32"}
    usage = subprocess.run([tool, "--dump-resource-usage", str(sm90_object)], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    for name, body in _functions(usage.replace("Function ", "Function : ")).items():
        assert re.search(r"\bLOCAL:0\b", body), f"{name[:80]} spills: {body.strip()}"
        if "GemmUniversal" in name:
            assert re.search(r"\bSTACK:0\b", body), f"{name[:80]} uses a stack: {body.strip()}"


_NO_GPU_PROBE = """
import sys
from glm5c.ops import cutlass_moe as cm
lib = cm.load_library(sys.argv[1])
assert lib.glm5c_gg_fp8_num_configs() == 2
names = [lib.glm5c_gg_fp8_config_name(i).decode() for i in range(2)]
smem = [lib.glm5c_gg_fp8_shared_bytes(i) for i in range(2)]
assert all(100 * 1024 < b <= 227 * 1024 for b in smem), smem  # fits an H100/H200 SM (227 KB per block)
sizes = [cm.workspace_size(c, 512, 132, lib) for c in range(2)]
assert all(s > 512 * 5 * 8 for s in sizes), sizes
# K not a multiple of 16: refused before any CUDA call
bad = lib.glm5c_gg_fp8_run(0, 4096, 4096, 4096, 4096, None, None, 4096, 8, 2048, 6100, 4096, 4096, 4096,
                           sizes[0], 132, 0, None)
assert bad == 1 and b"multiple of 16" in lib.glm5c_gg_fp8_last_error(), lib.glm5c_gg_fp8_last_error()
for config in range(2):
    try:
        cm._check(lib, lib.glm5c_gg_fp8_run(config, 4096, 4096, 4096, 4096, None, None, 4096, 8, 2048, 6144,
                                            4096, 2048, 4096, sizes[config], 132, 0, None), "run")
    except cm.CutlassError as e:
        print("clean failure:", e)
    else:
        raise SystemExit("a launch without a GPU reported success")
print("configs:", names, "shared memory:", smem, "workspace:", sizes)
"""


@pytest.mark.slow
def test_library_loads_and_fails_cleanly_without_gpu(sm90_object):
    """The shared library (linked from the object above) loads with ctypes on a machine without
    a GPU driver; a launch returns a CUDA error code with a message instead of crashing (run in
    a subprocess, so a crash would fail this test, not the session)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the probe's fake pointers would be launched for real")
    lib = build.build(timeout=1200)
    assert lib.suffix == ".so" and build.find_built() == lib
    done = subprocess.run([sys.executable, "-c", _NO_GPU_PROBE, str(lib)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean failure" in done.stdout and "CUDA error" in done.stdout, done.stdout
    print(done.stdout)


# ---------------------------------------------------------------------------------------------
# on a GPU


@pytest.fixture(scope="module")
def cuda_lib():
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs a CUDA GPU and compiled Triton kernels (run with TRITON_INTERPRET=0)")
    _toolchain_or_skip()
    path = build.build(timeout=1200)  # cached: built once per source
    os.environ[cutlass_moe.LIB_ENV] = str(path)
    cutlass_moe._lib = None
    yield cutlass_moe.load_library()
    os.environ.pop(cutlass_moe.LIB_ENV, None)


GEMM_CASES = {  # name: (rows per expert, N, K)
    "ragged_with_empty": ([3, 0, 70, 1, 0, 130, 17], 256, 512),
    "all_rows_one_expert": ([0, 0, 300, 0], 256, 512),
    "no_rows": ([0, 0, 0], 128, 256),
    "one_n_tile": ([7, 130, 0], 128, 256),  # odd N tiles: the 1x2 cluster's second CTA is all out of bounds
    "dims_not_128": ([5, 40, 0, 129], 200, 272),
    "decode_one_row_each": ([1] * 8 + [0] * 24, 2048, 1024),
}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", list(GEMM_CASES))
@pytest.mark.parametrize("config", list(cutlass_moe.CONFIGS))
@pytest.mark.parametrize("sets", [1, 2])
def test_gpu_grouped_gemm(cuda_lib, case, config, sets):
    counts, n, k = GEMM_CASES[case]
    g = torch.Generator().manual_seed(len(counts) * n + k)
    rows = sum(counts) + 5  # + rows of other ranks' pairs, past the last group
    a, a_s = fp8.quantize_act_groups(torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g))
    w0, s0 = _stack(len(counts), n, k, g)
    w1, s1 = _stack(len(counts), n, k, g) if sets == 2 else (None, None)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    cuda = [t.cuda() if t is not None else None for t in (a, a_s, w0, s0, w1, s1, ends)]
    got = cutlass_moe.grouped_gemm_fp8(*cuda, cutlass_moe.CONFIGS[config])
    torch.cuda.synchronize()
    assert got.shape == (rows, sets * n)
    stacks = [(w0, s0)] + ([(w1, s1)] if sets == 2 else [])
    _gemm_bound_ok(got.cpu(), a, a_s, w0, s0, ends, stacks, tensor_cores=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("config", ["auto", *cutlass_moe.CONFIGS])
def test_gpu_experts_match_reference_and_triton(cuda_lib, case, config):
    n_experts, top_k, d, i = 16, 4, 512, 256
    tokens = {"more_experts_than_tokens": 3, "one_token": 1}.get(case, 40)
    ids, weights = _routing(tokens, n_experts, top_k, case, seed=1)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(2)).bfloat16()
    w, scales = _weights(n_experts, d, i, seed=3)

    def cuda(ts):
        return [t.cuda() for t in ts]

    args = (x.cuda(), ids.cuda(), weights.cuda(), *cuda(w), tuple(cuda(scales)), 0, linear_ref)
    got = cutlass_moe.experts(*args, config=config).float().cpu()
    _check_whole_op(got, x, ids, weights, w, scales, 0)
    if tokens == 40:  # the 40-token cases share one Triton autotuning key (the others would tune anew)
        assert _rel(got, moe_triton.experts(*args).float().cpu()) < REL_REF
    # one expert-parallel shard: experts 4..7 of 16
    part = [t[4:8] for t in w]
    part_s = tuple(s[4:8] for s in scales)
    shard = cutlass_moe.experts(args[0], args[1], args[2], *cuda(part), tuple(cuda(part_s)), 4, linear_ref,
                                config=config).float().cpu()  # fmt: skip
    _check_whole_op(shard, x, ids, weights, part, part_s, 4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_replay(cuda_lib):
    """experts() captured in a CUDA graph (no host sync, static shapes) replays new routing and
    activations copied into its input buffers, bit-equal to eager calls."""
    n_experts, top_k, d, i, t = 16, 4, 512, 256, 8
    w, scales = _weights(n_experts, d, i, seed=3)
    w, scales = [x.cuda() for x in w], tuple(s.cuda() for s in scales)
    inputs = []
    for seed in (1, 2):
        ids, weights = _routing(t, n_experts, top_k, "random", seed=seed)
        inputs.append((torch.randn(t, d, generator=torch.Generator().manual_seed(seed)).bfloat16().cuda(),
                       ids.cuda(), weights.cuda()))  # fmt: skip
    static = [z.clone() for z in inputs[0]]
    for config in cutlass_moe.CONFIGS:

        def run(config=config):
            return cutlass_moe.experts(*static, *w, scales, 0, linear_ref, config=config)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warm-up (Triton compiles) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        for x, ids, weights in inputs:
            for buf, val in zip(static, (x, ids, weights)):
                buf.copy_(val)
            graph.replay()
            eager = cutlass_moe.experts(x, ids, weights, *w, scales, 0, linear_ref, config=config)
            torch.cuda.synchronize()
            assert torch.equal(out, eager)
