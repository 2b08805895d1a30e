"""DSA Triton kernels (ops/dsa_triton.py, ops/topk_triton.py) against their torch references.

Kernels run under Triton's interpreter on CPU tensors when TRITON_INTERPRET=1, which
tests/conftest.py sets before anything imports triton (Triton fixes interpretation when a
function is decorated, its own tl.* library included, so a test module cannot switch it on
later). With TRITON_INTERPRET=0 and a GPU the same tests run the compiled kernels on the GPU;
with neither they skip. The sm_90 build runs in a fresh process (tests/triton_sm90.py).

Error bounds (fp32 eps = 2^-24 per rounding; D = the dot width):
  * indexer scores: a sum of H*D products in another order than the reference's, so
    |got - want| <= 1e-5 * sum_h |w| sum_d |q| |k| (>= 20x the D * eps bound). FP8 inputs change
    nothing: the queries are quantized as the reference does (bit for bit) and products of two
    e4m3 values are exact in fp32. On a GPU a bf16 cache dots bf16-rounded queries (2^-8 of the
    sums) and Hopper's fp8 MMA keeps ~14 accumulator bits (2^-7 of the sums over 128 terms).
  * top-k: a set check that allows swaps only among keys whose score ties the boundary score
    (exactly, on the scores the kernel selected from; within the score bound on the reference's).
  * sparse MLA: outputs are convex combinations of value rows, so errors are measured against
    max |v|: fp32 1e-5 (exp2 vs exp and summation order); bf16 2^-7 (the interpreter truncates on
    the bf16 store, one bf16 ulp; on a GPU, probabilities round to bf16 before the PV product).
  * FP8 cache write: bit-exact keys and scales.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton

from glm5c.ops import REFERENCE, dsa, dsa_triton, topk_triton

from .triton_sm90 import compile_for_sm90

INTERPRET = triton.knobs.runtime.interpret  # as when the kernels were decorated
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py) or a GPU", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
ON_GPU = DEVICE == "cuda"
FP8 = torch.float8_e4m3fn
TRITON_OPS = dataclasses.replace(REFERENCE, indexer_topk=dsa_triton.indexer_topk, sparse_mla=dsa_triton.sparse_mla)


# ---- inputs -----------------------------------------------------------------------------------


def _paged(contexts: list[int], block_size: int, width: int, dtype: torch.dtype, g: torch.Generator):
    """A random paged cache [num_blocks + 1, block_size, width] whose sequences own shuffled,
    interleaved (non-contiguous) blocks, and their block tables padded with the scratch block."""
    blocks_each = [-(-n // block_size) for n in contexts]
    num_blocks = sum(blocks_each) + 2  # two blocks nobody owns
    cache = torch.randn(num_blocks + 1, block_size, width, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(blocks_each)
    tables = []
    for n in blocks_each:
        tables.append([order.pop() for _ in range(n)] + [num_blocks] * (max_blocks - n))
    return cache, torch.tensor(tables, dtype=torch.int32)


def _ragged(chunks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """chunks[i] = (first position, tokens) of sequence i in this step -> seq_ids, positions [T]."""
    seq_ids = [i for i, (_, n) in enumerate(chunks) for _ in range(n)]
    positions = [p for start, n in chunks for p in range(start, start + n)]
    return torch.tensor(seq_ids), torch.tensor(positions)


def _dev(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


# prefill chunks (one from position 0, one continuing), decodes, and MTP-like 1 + 2 drafts
CHUNKS = [(0, 9), (30, 1), (12, 6), (70, 1), (40, 3)]
CONTEXTS = [9, 31, 18, 71, 43]


# ---- indexer key cache ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP8, torch.bfloat16, torch.float32])
def test_index_cache_write(dtype):
    g = torch.Generator().manual_seed(1)
    dim, block_size, num_blocks = 40, 4, 6
    k = torch.randn(11, dim, generator=g) * torch.rand(11, 1, generator=g) * 5
    k[3] = 0.0  # an all-zero key: the scale floor, no division by zero
    slots = torch.randperm(num_blocks * block_size, generator=g)[:11]
    want = torch.zeros(num_blocks + 1, block_size, dim, dtype=dtype)
    want_scale = torch.zeros(num_blocks + 1, block_size) if dtype == FP8 else None
    dsa.index_cache_write_ref(k, slots, want, want_scale)
    got, got_scale = _dev(torch.zeros_like(want), torch.zeros(num_blocks + 1, block_size))
    dsa_triton.index_cache_write(*_dev(k, slots), got, got_scale if dtype == FP8 else None)
    got = got.cpu()
    if dtype == torch.bfloat16 and not ON_GPU:  # the interpreter truncates fp32 -> bf16
        rows = (k.view(torch.int32) & -65536).view(torch.float32).to(dtype)
        want = torch.zeros_like(want)
        dsa.index_cache_write_ref(rows, slots, want, None)
    if dtype != FP8:
        assert torch.equal(got, want)
        return
    assert torch.equal(got_scale.cpu(), want_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# ---- indexer scores ---------------------------------------------------------------------------


def _score_rel(cache_dtype: torch.dtype) -> float:
    """Relative error allowed against sum |w q k|: fp32 summation order under the interpreter; on a
    GPU also bf16-rounded queries (bf16 cache) or Hopper's ~14-bit fp8 MMA accumulator (128 terms)."""
    if not ON_GPU or cache_dtype == torch.float32:
        return 1e-5
    return 2.0**-8 if cache_dtype == torch.bfloat16 else 2.0**-7


def _score_bound(q, weights, cache, tables, seq_ids, positions, scale, rel):
    """rel * sum_h |w| * sum_d |q| |k|: the scale of rounding error in a reordered sum."""
    absq = q.abs() if scale is None else dsa.quantize_rows_fp8(q)[0].float().abs()
    absw = weights.abs() if scale is None else weights.abs() * dsa.quantize_rows_fp8(q)[1]
    keys = dsa.gather_sequences(cache.float().abs(), tables)[seq_ids]  # [T, S, D]
    if scale is not None:
        keys = keys * dsa.gather_sequences(scale[..., None], tables)[seq_ids]
    return rel * torch.einsum("th,thd,tsd->ts", absw, absq, keys)


@pytest.mark.parametrize("heads,dim", [(1, 16), (3, 24), (8, 40)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8])
@pytest.mark.parametrize("block_t", [1, 4])
def test_indexer_scores(heads, dim, cache_dtype, block_t):
    g = torch.Generator().manual_seed(heads * 100 + dim)
    cache, tables = _paged(CONTEXTS, 8, dim, torch.float32, g)
    scale = None
    if cache_dtype == FP8:
        cache, scale = dsa.quantize_rows_fp8(cache)
    else:
        cache = cache.to(cache_dtype)
    seq_ids, positions = _ragged(CHUNKS)
    q = torch.randn(len(seq_ids), heads, dim, generator=g)
    weights = torch.randn(len(seq_ids), heads, generator=g)
    want = dsa.indexer_scores_ref(q, weights, cache, tables, seq_ids, positions, scale)
    cfg = dataclasses.replace(dsa_triton.score_config(1, 1, heads, cache.dtype), block_t=block_t, block_s=16, chunk=32)
    got = dsa_triton.indexer_scores(
        *_dev(q, weights, cache, tables, seq_ids, positions), None if scale is None else scale.to(DEVICE), config=cfg
    ).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got.isneginf(), want.isneginf())
    bound = _score_bound(q, weights, cache, tables, seq_ids, positions, scale, _score_rel(cache_dtype))
    finite = torch.isfinite(want)
    assert ((got - want).abs()[finite] <= bound[finite] + 1e-30).all()


# ---- top-k ------------------------------------------------------------------------------------


def _assert_topk_set(idx: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, k: int, tol=None) -> None:
    """idx [T, k] is a valid top-k of each row's columns <= position: the right count, distinct,
    -1 exactly in the empty slots, and no unselected candidate beats a selected one (ties at the
    boundary may go either way; `tol` [T] widens 'tie' to scores within tol of the boundary)."""
    for t in range(idx.shape[0]):
        n = min(int(positions[t]) + 1, scores.shape[1])
        row = idx[t].tolist()
        chosen = [i for i in row if i >= 0]
        assert len(chosen) == min(n, k) and row.count(-1) == k - len(chosen), f"row {t}: wrong count"
        assert len(set(chosen)) == len(chosen) and all(i < n for i in chosen), f"row {t}: bad indices"
        if n > k:
            mask = torch.ones(n, dtype=torch.bool)
            mask[chosen] = False
            worst_in, best_out = scores[t, chosen].min(), scores[t, :n][mask].max()
            slack = 0.0 if tol is None else float(tol[t])
            assert worst_in >= best_out - slack, f"row {t}: {best_out} left out, {worst_in} kept"


@pytest.mark.parametrize("chunk,block", [(64, 32), (4096, 1024)])
def test_topk_prefix(chunk, block):
    g = torch.Generator().manual_seed(5)
    rows, width, k = 7, 300, 40
    scores = torch.randn(rows, width, generator=g)
    scores[1] = scores[1].round()  # many exact ties across the boundary
    scores[2, :200] = 0.5  # a run of ties larger than k
    scores[3] = -scores[3].abs()  # negative scores (the ordered-key mapping)
    scores[4, 100:] = float("inf")  # beyond the row's prefix: must never be picked
    positions = torch.tensor([5, 299, 250, 299, 99, 40, 39])  # shorter than, equal to, longer than k
    got = topk_triton.topk_prefix(*_dev(scores, positions), k, chunk=chunk, block=block).cpu()
    _assert_topk_set(got, scores, positions, k)
    assert got[0, :6].tolist() == list(range(6))  # short rows: every candidate, in order


# ---- indexer top-k, end to end -----------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("topk", [8, 48])  # shorter than some contexts / longer than every one
def test_indexer_topk(fp8, topk):
    g = torch.Generator().manual_seed(11 + topk)
    heads, dim = 8, 24
    cache, tables = _paged(CONTEXTS, 4, dim, torch.float32, g)
    scale = None
    if fp8:
        cache, scale = dsa.quantize_rows_fp8(cache)
    seq_ids, positions = _ragged(CHUNKS)
    q = torch.randn(len(seq_ids), heads, dim, generator=g)
    weights = torch.rand(len(seq_ids), heads, generator=g)
    args = (q, weights, cache, tables, seq_ids, positions)
    got = dsa_triton.indexer_topk(*_dev(*args), topk, None if scale is None else scale.to(DEVICE)).cpu()
    assert got.shape == (len(seq_ids), topk) and got.dtype == torch.int32
    # exact ties on the scores the kernels computed, and near-ties within their error on the reference's
    own = dsa_triton.indexer_scores(*_dev(*args), None if scale is None else scale.to(DEVICE)).cpu()
    _assert_topk_set(got, own, positions, topk)
    want_scores = dsa.indexer_scores_ref(*args, scale)
    tol = 2 * _score_bound(*args, scale, _score_rel(cache.dtype)).amax(dim=1)
    _assert_topk_set(got, want_scores, positions, topk, tol)
    want = dsa.indexer_topk_ref(*args, topk, scale)
    assert (got >= 0).sum() == (want >= 0).sum()


# ---- sparse MLA -------------------------------------------------------------------------------


def _indices(positions: torch.Tensor, topk: int, g: torch.Generator) -> torch.Tensor:
    """Random distinct visible positions per token (at most topk), -1 scattered in the other slots."""
    rows = []
    for p in positions.tolist():
        pick = torch.randperm(p + 1, generator=g)[:topk].tolist()
        row = pick + [-1] * (topk - len(pick))
        rows.append([row[i] for i in torch.randperm(topk, generator=g).tolist()])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("heads,v_dim,rope_dim", [(1, 32, 8), (3, 24, 16), (8, 128, 32), (20, 32, 8), (64, 32, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 3])
def test_sparse_mla(heads, v_dim, rope_dim, dtype, splits):
    g = torch.Generator().manual_seed(heads + v_dim)
    cache, tables = _paged(CONTEXTS, 4, v_dim + rope_dim, dtype, g)
    seq_ids, positions = _ragged(CHUNKS)
    q = torch.randn(len(seq_ids), heads, v_dim + rope_dim, generator=g).to(dtype)
    indices = _indices(positions, 24, g)  # shorter than some contexts, longer than others
    scale = (v_dim + rope_dim) ** -0.5
    want = dsa.sparse_mla_ref(q, cache, indices, tables, seq_ids, scale, v_dim).float()
    got = dsa_triton.sparse_mla_with(None, splits, *_dev(q, cache, indices, tables, seq_ids), scale, v_dim)
    assert got.dtype == dtype and got.shape == (len(seq_ids), heads, v_dim)
    bound = (1e-5 if dtype == torch.float32 else 2.0**-7) * cache[..., :v_dim].float().abs().max()
    assert (got.cpu().float() - want).abs().max() <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_lowp_matches_the_reference(dtype):
    """The CPU BF16 graphs' attention (matmuls in the model's dtype) against the fp32 reference."""
    g = torch.Generator().manual_seed(7)
    cache, tables = _paged(CONTEXTS, 4, 40, dtype, g)
    seq_ids, positions = _ragged(CHUNKS)
    q = torch.randn(len(seq_ids), 8, 40, generator=g).to(dtype)
    indices = _indices(positions, 24, g)
    want = dsa.sparse_mla_ref(q, cache, indices, tables, seq_ids, 40**-0.5, 32).float()
    got = dsa.sparse_mla_lowp(q, cache, indices, tables, seq_ids, 40**-0.5, 32)
    assert got.dtype == dtype and got.shape == want.shape
    bound = (1e-5 if dtype == torch.float32 else 2.0**-6) * cache[..., :32].float().abs().max()
    assert (got.float() - want).abs().max() <= bound


@pytest.mark.parametrize("rows", [[0], [3, 9], None], ids=["1-token", "2-tokens", "all"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", ["dsa_cpu.sparse_mla", "dsa.sparse_mla_gemv", "glm5c.sparse_mla_cpu"])
def test_sparse_mla_cpu_matches_the_reference(rows, compiled, name):
    """The CPU BF16 graphs' attention: fused matrix-vector loops (reading the paged cache in place
    when compiled), which dsa_cpu.sparse_mla picks for 1-4 tokens, and the C++ kernel beyond."""
    g = torch.Generator().manual_seed(8)
    cache, tables = _paged(CONTEXTS, 4, 40, torch.bfloat16, g)
    seq_ids, positions = _ragged(CHUNKS)
    q = torch.randn(len(seq_ids), 8, 40, generator=g).bfloat16()
    indices = _indices(positions, 24, g)
    if rows is not None:
        q, indices, seq_ids = q[rows], indices[rows], seq_ids[rows]
    want = dsa.sparse_mla_ref(q, cache, indices, tables, seq_ids, 40**-0.5, 32).float()
    from glm5c.ops import dsa_cpu

    module, fn = name.split(".")
    op = getattr({"dsa": dsa, "dsa_cpu": dsa_cpu, "glm5c": torch.ops.glm5c}[module], fn)  # the kernel's op: all tokens
    op = torch.compile(op, fullgraph=True, dynamic=False) if compiled else op
    got = op(q, cache, indices, tables, seq_ids, 40**-0.5, 32)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).abs().max() <= 2.0**-6 * cache[..., :32].float().abs().max()


# ---- the tiny model ---------------------------------------------------------------------------


def test_tiny_model_greedy_tokens_match_references(tiny_dir):
    """Prompts longer than index_topk (16): DSA selects, and the shared-indexer layer reuses the
    previous layer's top-k. Same greedy tokens with the kernels as with the references."""
    from glm5c import LLM, SamplingParams

    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(22, 1300, (n,), generator=g).tolist() for n in (37, 21, 6)]
    want = LLM(tiny_dir, dtype="float32").generate(prompts, params)
    llm = LLM(tiny_dir, dtype="float32", device=DEVICE, ops=TRITON_OPS)
    assert llm.config.index_topk < 21
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


# ---- compiling for sm_90 without a GPU -------------------------------------------------------


def _job(kernel: str, signature: dict[str, str], values: dict[str, int], constexprs: dict, num_warps: int,
         module: str = "dsa_triton") -> dict:  # fmt: skip
    """A compile job for tests/triton_sm90.py. Pointers and the integers whose GLM-5 value (in
    `values`) is divisible by 16 are marked so, as a launch would specialise them (without it
    loads are neither vectorized nor pipelined)."""
    divisible = [a for a, t in signature.items() if t.startswith("*") or values.get(a, 1) % 16 == 0]
    signature = dict(signature, **{c: "constexpr" for c in constexprs})
    return {"module": f"glm5c.ops.{module}", "kernel": kernel, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "options": {"num_warps": num_warps, "num_stages": 2}}  # fmt: skip


def test_kernels_compile_for_sm90():
    """GLM-5 shapes: the 64-head sparse MLA tile (64 x 64 over 512 + 64) and the prefill fp8 score
    tile (128 x 64 x 128) use wgmma; 8-head and decode tiles use mma.sync; gathers are pipelined
    through shared memory (cp.async); everything fits in an H100/H200's 227 KB of shared memory."""
    i32 = "i32"
    mla = dict(q_ptr="*bf16", kv_ptr="*bf16", idx_ptr="*i32", bt_ptr="*i32", seq_ptr="*i64", out_ptr="*bf16",
               lse_ptr="*fp32", H=i32, K=i32, DV=i32, DK=i32, max_blocks=i32, stride_qt=i32, stride_qh=i32,
               stride_it=i32, scale_log2="fp32", splits=i32)  # fmt: skip
    mla_v = dict(H=64, K=2048, DV=512, DK=576, max_blocks=2048, stride_qt=64 * 576, stride_qh=576, stride_it=2048)
    mla_c = dict(CACHE_BLOCK=64, BLOCK_DV=512, BLOCK_DR=64, UPCAST=False, PRECISION="ieee")
    scores = dict(q_ptr="*fp32", w_ptr="*fp32", k_ptr="*fp8e4nv", ks_ptr="*fp32", bt_ptr="*i32", seq_ptr="*i64",
                  pos_ptr="*i64", out_ptr="*fp32", T=i32, H=i32, D=i32, S=i32, max_blocks=i32, stride_qt=i32,
                  stride_qh=i32, stride_wt=i32, stride_ot=i32)  # fmt: skip
    scores_v = dict(T=4096, H=32, D=128, S=131072, max_blocks=2048, stride_qt=4096, stride_qh=128, stride_wt=32,
                    stride_ot=131072)  # fmt: skip
    scores_c = dict(CACHE_BLOCK=64, BLOCK_H=32, BLOCK_D=128, CHUNK=512, KEY_SCALE=True, QUANT_Q=True, UPCAST=False,
                    PRECISION="ieee")  # fmt: skip
    radix = dict(scores_ptr="*fp32", pos_ptr="*i64", ws_ptr="*i32", S=i32, K=i32, stride_s=i32, ws_stride=i32)
    radix_v = dict(S=131072, K=2048, stride_s=131072, ws_stride=6146, stride_o=2048)
    write = dict(k_ptr="*bf16", slot_ptr="*i64", cache_ptr="*fp8e4nv", scale_ptr="*fp32", D=i32, stride_k=i32)
    combine = dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16", H=i32, DV=i32, splits=i32)
    jobs = {  # name: (job, needs wgmma)
        "sparse_mla 64 heads": (_job("_sparse_mla_kernel", mla, mla_v, dict(mla_c, BLOCK_H=64, BLOCK_N=64), 8), True),
        "sparse_mla 8 heads, split": (_job("_sparse_mla_kernel", dict(mla, out_ptr="*fp32"),
                                           dict(mla_v, H=8, stride_qt=8 * 576), dict(mla_c, BLOCK_H=16, BLOCK_N=32), 4),
                                      False),
        "mla combine": (_job("_mla_combine_kernel", combine, dict(H=64, DV=512), dict(BLOCK_SPLITS=4, BLOCK_DV=512), 4),
                        False),
        "fp8 scores, prefill": (_job("_indexer_scores_kernel", scores, scores_v,
                                     dict(scores_c, BLOCK_T=4, BLOCK_S=64), 8), True),
        "fp8 scores, decode": (_job("_indexer_scores_kernel", scores, scores_v,
                                    dict(scores_c, BLOCK_T=1, BLOCK_S=128), 4), False),
        "fp8 cache write": (_job("_index_cache_write_kernel", write, dict(D=128, stride_k=128),
                                 dict(QUANT=True, BLOCK_D=128), 4), False),
        "radix histogram": (_job("_radix_hist_kernel", radix, radix_v, dict(ROUND=2, CHUNK=4096, BLOCK=1024), 4,
                                 "topk_triton"), False),
        "radix gather": (_job("_radix_gather_kernel", dict(radix, out_ptr="*i32", stride_o=i32), radix_v,
                              dict(CHUNK=4096, BLOCK=1024), 4, "topk_triton"), False),
    }  # fmt: skip
    try:
        results = compile_for_sm90([job for job, _ in jobs.values()])
    except (RuntimeError, OSError) as e:
        pytest.skip(f"cannot compile for sm_90 here: {e}")
    for (name, (_, wgmma)), res in zip(jobs.items(), results):
        assert "error" not in res, f"{name}: {res.get('error')}"
        assert res["cubin_bytes"] > 0 and res["shared_bytes"] <= 227 * 1024, f"{name}: {res}"
        if name.startswith(("sparse_mla", "fp8 scores")):
            assert res["cp_async"] and res["mma"], f"{name}: {res}"
        if wgmma:
            assert any(m.startswith("wgmma.mma_async") for m in res["mma"]), f"{name}: {res['mma']}"
