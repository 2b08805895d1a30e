"""Ahead-of-time compiled steps (graphs/): compiled == eager for every bucket, padding is
harmless, a fresh process loads artifacts with zero compilations, and stale or corrupted
artifacts are refused with a clear message."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from glm5c import LLM, SamplingParams
from glm5c.batch import SeqChunk, build_step_batch
from glm5c.graphs.buckets import Buckets
from glm5c.graphs.compile import compile_artifacts, ops_for
from glm5c.graphs.manifest import MANIFEST_FILE, StaleArtifactsError
from glm5c.graphs.runner import GraphRunner
from glm5c.kv_cache import KVCache
from glm5c.ops import cpu_kernels
from glm5c.weights import build_model

from .conftest import TINY_BUCKETS as BUCKETS


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts):
    return tiny_artifacts


@pytest.fixture(scope="module")
def compiled(tiny_dir, artifacts):
    return LLM(tiny_dir, artifacts=artifacts)


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(22, 1300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("num_seqs", [1, 3, 4])  # 3 decodes run padded in bucket 4
def test_compiled_step_equals_eager(compiled, num_seqs):
    runner, model = compiled.runner, compiled.model
    prompts = _seqs([9, 30, 17, 2][:num_seqs])
    outs = []
    for use_graph in (False, True):
        cache = runner.new_cache(num_blocks=40)
        tables = [list(range(i * 10 + 9, i * 10 - 1, -1)) for i in range(num_seqs)]  # non-contiguous
        for pos in range(max(len(p) for p in prompts)):  # token-by-token through the cache
            chunks = [SeqChunk([p[pos]], pos, t) for p, t in zip(prompts, tables) if pos < len(p)]
            batch = build_step_batch(chunks, 4, cache.pad_slot, max_blocks=runner.max_blocks)
            with torch.inference_mode():
                hidden = runner(batch, cache) if use_graph else model(batch, cache)
        outs.append((hidden, [t[:-1].clone() for t in cache.latent]))  # all but the scratch block
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(outs[0][1], outs[1][1]))


def test_compiled_generation_equals_eager(tiny_dir, compiled):
    """Prompts longer than the largest bucket prefill in bucket-sized chunks; tokens are identical."""
    prompts = _seqs([3, 21, 40], seed=5)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eager = LLM(tiny_dir).generate(prompts, params)
    assert [o.token_ids for o in compiled.generate(prompts, params)] == [o.token_ids for o in eager]


def test_fresh_process_loads_with_zero_compilations(tiny_dir, artifacts, tmp_path):
    cache_dir = tmp_path / "inductor-cache"
    code = (
        "import sys, torch; from glm5c import LLM, SamplingParams; from glm5c.graphs.compile import compile_count\n"
        "llm = LLM(sys.argv[1], artifacts=sys.argv[2])\n"
        "imported = any(m in sys.modules for m in ('torch._inductor', 'torch._dynamo'))\n"
        "out = llm.generate([[100, 101, 102, 103, 104, 105]], SamplingParams(max_tokens=4, temperature=0))\n"
        "print(compile_count(), len(out[0].token_ids), imported)"
    )
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code, str(tiny_dir), str(artifacts)], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # loading did not even import a compiler (the fp32 graphs' opaque experts op imports Dynamo
    # at its first call, to keep it out of traces, and compiles nothing)
    assert result.stdout.split() == ["0", "4", "False"]
    assert not cache_dir.exists() or not any(cache_dir.rglob("*.so"))  # nothing was built


@pytest.mark.parametrize("num_seqs", [1, 3, 4])  # 3 run padded in bucket 4
def test_compiled_mtp_step_equals_eager(compiled, num_seqs):
    """The MTP layer's graph: hidden states and the MTP layer's cache equal the eager layer's,
    token by token through non-contiguous blocks."""
    runner, model = compiled.runner, compiled.model
    assert runner.has_mtp and [b.tokens for b in runner.manifest.mtp_buckets] == list(BUCKETS)
    prompts = _seqs([9, 30, 17, 2][:num_seqs], seed=3)
    g = torch.Generator().manual_seed(4)
    states = [torch.randn(len(p), model.config.hidden_size, generator=g) for p in prompts]
    mtp_layer = model.config.num_hidden_layers
    outs = []
    for use_graph in (False, True):
        cache = runner.new_cache(num_blocks=40)
        tables = [list(range(i * 10 + 9, i * 10 - 1, -1)) for i in range(num_seqs)]
        for pos in range(max(len(p) for p in prompts)):
            live = [i for i, p in enumerate(prompts) if pos < len(p)]
            batch = build_step_batch([SeqChunk([prompts[i][pos]], pos, tables[i]) for i in live], 4, cache.pad_slot,
                                     max_blocks=runner.max_blocks)  # fmt: skip
            hidden = torch.stack([states[i][pos] for i in live])
            with torch.inference_mode():
                x = runner.mtp(batch, cache, hidden) if use_graph else model.mtp_hidden(batch, cache, hidden)
        outs.append((x, cache.latent[mtp_layer][:-1].clone(), cache.index_k[mtp_layer][:-1].clone()))
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(*outs))
    assert outs[0][1].abs().sum() > 0  # the MTP layer's cache was written


def test_compiled_mtp_drafts_equal_eager(tiny_dir, artifacts):
    """Speculative decoding on artifacts runs the MTP layer's graphs: the same drafts (so the same
    acceptance) as drafting eagerly, greedy output equal to decoding without drafts, and nothing
    compiled at start-up."""
    from glm5c.engine import EngineConfig
    from glm5c.graphs.compile import compile_count

    prompts = _seqs([3, 21, 40], seed=5)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    spec = EngineConfig(num_speculative_tokens=3)
    before = compile_count()
    graph, eager = (LLM(tiny_dir, artifacts=artifacts, engine_config=spec) for _ in range(2))
    assert compile_count() == before
    eager.engine.drafter.mtp_hidden = eager.model.mtp_hidden  # the same drafter, the MTP layer run eagerly
    runs = []
    for llm in (graph, eager):
        drafter, drafts = llm.engine.drafter, []

        def record(entries, original=drafter.catch_up_and_draft, drafts=drafts):
            original(entries)
            drafts.append([list(e.seq.draft) for e in entries])

        drafter.catch_up_and_draft = record
        runs.append(([o.token_ids for o in llm.generate(prompts, params)], drafts))
    assert runs[0] == runs[1] and any(d for step in runs[0][1] for d in step)
    assert runs[0][0] == [o.token_ids for o in LLM(tiny_dir, artifacts=artifacts).generate(prompts, params)]


def test_artifacts_without_mtp_graphs_are_refused_for_speculation(tiny_dir, artifacts, tmp_path):
    """Artifacts from before the MTP layer was compiled still serve plain decoding; speculative
    decoding on them is refused with the rebuild command, not run eagerly at a fraction of the speed."""
    from glm5c.engine import EngineConfig

    old = _copy(artifacts, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["mtp_buckets"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert not LLM(tiny_dir, artifacts=old).runner.has_mtp
    with pytest.raises(StaleArtifactsError, match=r"no graphs for the MTP layer.*Rebuild them: glm5c compile --model"):
        LLM(tiny_dir, artifacts=old, engine_config=EngineConfig(num_speculative_tokens=2))


def test_cleared_inputs_touch_only_the_scratch_block(compiled):
    """What a CUDA graph's warm-up runs for buckets other than the current step's (runner.capture):
    main and MTP graphs on cleared inputs leave every real cache entry as it was."""
    runner = compiled.runner
    cache = runner.new_cache(num_blocks=8)
    g = torch.Generator().manual_seed(7)
    for t in cache.latent + [k for k in cache.index_k if k is not None]:
        t.copy_(torch.randn(t.shape, generator=g))
    before = [t[:-1].clone() for t in cache.latent + [k for k in cache.index_k if k is not None]]
    for key in sorted(runner._packages):
        runner._inputs[key].clear(cache.pad_slot, runner.block_size)
        with torch.inference_mode():
            runner._run(key, cache)
    after = [t[:-1] for t in cache.latent + [k for k in cache.index_k if k is not None]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_compile_without_mtp_graphs(tiny_dir, tmp_path):
    """--no-mtp leaves the MTP layer out: plain decoding runs, speculative decoding is refused
    with a rebuild command that includes it, and a stale-artifacts command keeps --no-mtp."""
    from glm5c.cli import main
    from glm5c.engine import EngineConfig

    out = tmp_path / "no-mtp"
    assert main(["compile", "--model", str(tiny_dir), "--out", str(out), "--buckets", "2", "--max-model-len", "32",
                 "--block-size", "4", "--no-mtp"]) == 0  # fmt: skip
    llm = LLM(tiny_dir, artifacts=out)
    assert not llm.runner.has_mtp and llm.runner.manifest.mtp_left_out
    assert "--no-mtp" in llm.runner.manifest.rebuild_command(out, tiny_dir, "cpu", "float32")
    with pytest.raises(StaleArtifactsError, match=r"\(built with --no-mtp\)\. Rebuild them: glm5c compile .*--block-size 4$"):
        LLM(tiny_dir, artifacts=out, engine_config=EngineConfig(num_speculative_tokens=1))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_changed_config_is_refused(tiny_dir, artifacts, tmp_path):
    model = _copy(tiny_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StaleArtifactsError, match=r"config\.json \(hash\).*Rebuild them: glm5c compile --model"):
        LLM(model, artifacts=artifacts)


def test_changed_weights_are_refused(tiny_dir, artifacts, tmp_path):
    model = _copy(tiny_dir, tmp_path / "model")
    shard = sorted(model.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header] ^= 0xFF  # flip bits in the first tensor's first byte
    shard.write_bytes(bytes(data))
    with pytest.raises(StaleArtifactsError, match=r"weights \(fingerprint\)"):
        LLM(model, artifacts=artifacts)


def test_artifacts_with_other_ops_are_refused(tiny_dir, artifacts, tmp_path):
    """An older glm5c's per-bucket op choices (named in the manifest) are not loaded beside this one's."""
    old = _copy(artifacts, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["ops"]["linear"] = "linear_before"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleArtifactsError, match=r"compiled with other ops \(linear: built with 'linear_before', "
                                                  r"now '\w+'\)\. Rebuild them: glm5c compile --model"):  # fmt: skip
        LLM(tiny_dir, artifacts=old)


def test_other_dtype_is_refused(tiny_dir, artifacts):
    with pytest.raises(StaleArtifactsError, match="dtype: built for 'float32', now 'bfloat16'"):
        LLM(tiny_dir, dtype="bfloat16", artifacts=artifacts)


@pytest.mark.parametrize("damage", ["truncated_graph", "missing_graph", "missing_mtp_graph", "garbage_manifest",
                                    "no_manifest"])  # fmt: skip
def test_corrupted_artifacts_give_a_clear_error(tiny_dir, artifacts, tmp_path, damage):
    broken = _copy(artifacts, tmp_path / "artifacts")
    graph = broken / "step_4.pt2"
    if damage == "truncated_graph":
        graph.write_bytes(graph.read_bytes()[:1000])
    elif damage == "missing_graph":
        graph.unlink()
    elif damage == "missing_mtp_graph":
        (broken / "mtp_1.pt2").unlink()
    elif damage == "garbage_manifest":
        (broken / MANIFEST_FILE).write_text("{not json")
    else:
        (broken / MANIFEST_FILE).unlink()
    expected = {"truncated_graph": "step_4.pt2 is corrupted", "missing_graph": "step_4.pt2 is missing",
                "missing_mtp_graph": "mtp_1.pt2 is missing",
                "garbage_manifest": "is corrupted", "no_manifest": "not a glm5c artifact directory"}[damage]  # fmt: skip
    with pytest.raises(StaleArtifactsError, match=expected):
        LLM(tiny_dir, artifacts=broken)


def test_chunks_fill_the_buffers_as_their_batch_does():
    """StaticInputs.fill_chunks (a CPU runner's step) writes what fill(build_step_batch(...)) writes:
    decodes and prefill chunks, a partly filled bucket (padding), rows of several widths."""
    from glm5c.graphs.step import StaticInputs

    pad_slot, bs = 20 * 4, 4
    cases = [
        [SeqChunk([5], 9, [3, 1, 7]), SeqChunk([6], 0, [2]), SeqChunk([7], 3, [4])],  # decodes, 3 of 4 tokens
        [SeqChunk([1, 2, 3, 4, 5], 2, [9, 8]), SeqChunk([8], 12, [0, 5, 6, 10]), SeqChunk([2, 2], 0, [11])],
        [SeqChunk([3], 7, [12, 13])] * 8,  # a full bucket: no padding
    ]
    for chunks in cases:
        a, b = StaticInputs(8, 6, "cpu"), StaticInputs(8, 6, "cpu")
        for t in (*b.args(), ):  # stale contents: fill_chunks must overwrite all
            t.fill_(77)
        batch = build_step_batch(chunks, bs, pad_slot)
        a.fill(batch, pad_slot, bs, width=batch.block_tables.shape[1])
        assert b.fill_chunks(chunks, bs, pad_slot) == sum(len(c.token_ids) for c in chunks)
        for x, y in zip(a.args(), b.args()):
            assert torch.equal(x, y)
        a.fill(batch, pad_slot, bs, width=5)  # wider than the longest table: scratch blocks after it
        assert b.fill_chunks(chunks, bs, pad_slot, min_width=5) == sum(len(c.token_ids) for c in chunks)
        for x, y in zip(a.args(), b.args()):
            assert torch.equal(x, y)
        assert a.args()[4].shape == (9, 5) and a.args()[4].is_contiguous()
    with pytest.raises(ValueError, match="sequence 0 needs 9 cache slots but has 2 blocks"):
        StaticInputs(8, 6, "cpu").fill_chunks([SeqChunk([1], 8, [0, 1])], bs, pad_slot)
    with pytest.raises(ValueError, match="does not fit a bucket of 8 tokens"):
        StaticInputs(8, 6, "cpu").fill_chunks([SeqChunk(list(range(9)), 0, [0, 1, 2])], bs, pad_slot)
    with pytest.raises(ValueError, match="block tables 7 blocks wide do not fit a bucket of 6 blocks"):
        StaticInputs(8, 6, "cpu").fill(build_step_batch(cases[0], bs, pad_slot), pad_slot, bs, width=7)
    with pytest.raises(ValueError, match="7 blocks, more than max_blocks=6"):
        StaticInputs(8, 6, "cpu").fill_chunks([SeqChunk([1], 0, list(range(7)))], bs, pad_slot)


def test_step_larger_than_the_largest_bucket_is_an_error(compiled):
    cache = compiled.runner.new_cache(num_blocks=8)
    batch = build_step_batch([SeqChunk(list(range(5)), 0, [0, 1])], 4, cache.pad_slot)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        compiled.runner(batch, cache)


def test_buckets():
    b = Buckets.parse("8, 1,4,4")
    assert b.sizes == (1, 4, 8) and b.pick(1) == 1 and b.pick(3) == 4 and b.pick(8) == 8
    with pytest.raises(ValueError, match="comma-separated"):
        Buckets.parse("1,two")
    with pytest.raises(ValueError, match="positive"):
        Buckets((0, 4))
    assert Buckets.default("cuda").sizes[:4] == (1, 2, 4, 8) and 256 in Buckets.default("cuda").sizes


def test_compile_refuses_a_foreign_directory(tiny_dir, tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a glm5c artifact directory"):
        compile_artifacts(tiny_dir, tmp_path, Buckets((1,)), progress=lambda _: None)


def test_cli_compile_bad_input(capsys, tmp_path):
    from glm5c.cli import main

    assert main(["compile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "a"), "--buckets", "1"]) == 2
    assert "glm5c: error:" in capsys.readouterr().err
    assert main(["compile", "--out", str(tmp_path / "a"), "--buckets", "x"]) == 2
    assert "comma-separated" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager(tiny_dir, tmp_path):
    """CUDA graphs captured at load replay what the same ops compute eagerly (main and MTP
    graphs, every bucket, BF16 tolerances: compiled kernels round differently), and generation
    with and without MTP drafts runs through them."""
    from glm5c.engine import EngineConfig

    out = tmp_path / "cuda-artifacts"
    compile_artifacts(tiny_dir, out, Buckets(BUCKETS), device="cuda", dtype="bfloat16", block_size=4,
                      max_model_len=128, progress=lambda _: None)  # fmt: skip
    cuda = {"device": "cuda", "dtype": "bfloat16", "artifacts": out}
    llm = LLM(tiny_dir, **cuda, engine_config=EngineConfig(num_speculative_tokens=2))
    runner, model = llm.runner, llm.model
    assert runner._graph_cache is llm.engine.cache and len(runner._graphs) == 2 * len(BUCKETS)  # captured at load
    d = model.config.hidden_size
    for seqs in (1, 3, 4):
        chunks = [SeqChunk([40 + s], 5, [4 * s, 4 * s + 1]) for s in range(seqs)]  # decodes at position 5
        hidden = torch.randn(seqs, d, generator=torch.Generator().manual_seed(seqs)).to("cuda", torch.bfloat16)
        results = []
        for use_graph in (True, False):
            cache = llm.engine.cache if use_graph else runner.new_cache(llm.engine.cache.num_blocks)
            batch = build_step_batch(chunks, 4, cache.pad_slot, "cuda", max_blocks=runner.max_blocks)
            with torch.inference_mode():
                main = runner(batch, cache) if use_graph else model(batch, cache)
                mtp = runner.mtp(batch, cache, hidden) if use_graph else model.mtp_hidden(batch, cache, hidden)
            results.append((main.float().clone(), mtp.float().clone()))
        for graph, eager in zip(*results):
            assert (graph - eager).abs().max() <= 0.05 * eager.abs().max() + 1e-3, (seqs, (graph - eager).abs().max())
    prompts = _seqs([3, 21, 40], seed=5)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for engine_config in (None, EngineConfig(num_speculative_tokens=2)):
        outs = LLM(tiny_dir, **cuda, engine_config=engine_config).generate(prompts, params)
        assert [len(o.token_ids) for o in outs] == [12, 12, 12]


def test_bf16_cpu_graphs_pick_their_ops_per_bucket(tiny_dir, tmp_path):
    """A CPU's BF16 graphs: in a small bucket matrix-vector linears, in both the experts kernel's
    op (moe_cpu.experts; 2 tokens x top-2 = half of tiny's 8 experts, past the gathered form's
    quarter); each bucket matches the same math eagerly."""
    out = tmp_path / "bf16"
    manifest = compile_artifacts(tiny_dir, out, Buckets((2, 128)), dtype="bfloat16", block_size=4, max_model_len=160,
                                 progress=lambda _: None)  # fmt: skip
    assert manifest.ops["experts"] == "moe_cpu.experts" and manifest.ops["linear"] == "cpu_linear.linear_cpu" and manifest.dtype == "bfloat16"
    assert manifest.ops["experts_shared"] == "moe_cpu.experts_shared"  # tiny's shared expert: inside the experts' call
    compiled = LLM(tiny_dir, dtype="bfloat16", artifacts=out)
    eager_model = LLM(tiny_dir, dtype="bfloat16", ops=ops_for("cpu", "bfloat16")[0]).model
    runner = compiled.runner
    if cpu_kernels.has_avx512_bf16():  # weights blocked at load (Ops.pack_experts, pack_linear), in both
        for model in (runner.model, eager_model):
            assert model.layers[1].mlp.experts.gate_proj.shape == (8, 2, 32, 16, 2)  # tiny: 8 x [32, 64]
            attn = model.layers[1].self_attn
            assert attn.q_a_proj.weight.shape == (2, 32, 16, 2) and model.lm_head.weight.dim() == 4
            assert attn.kv_b_proj.weight.dim() == 2  # read as per-head views: as loaded, blocked as copies
            assert attn.w_uk_t.shape == (4, 2, 8, 16, 2) and attn.w_uv.shape == (4, 1, 16, 16, 2)  # tiny: L 32, nope 16, v 16
        plain = build_model(tiny_dir, dtype=torch.bfloat16, ops=dataclasses.replace(ops_for("cpu", "bfloat16")[0], pack_experts=None))
        with pytest.raises(StaleArtifactsError, match=r"blocked for the CPU kernels or not\) differ .* Rebuild them: glm5c compile "):
            GraphRunner(out, plain, tiny_dir)
    assert manifest.ops["indexer_skips_short"] == "torch.cond"
    # bucket 2 (gemv linears), and bucket 128 from six 14-token prompts: each within
    # index_topk, so no bf16 near-tie in the indexer's top-k can pick other keys in the two runs
    # (and the graphs skip the indexer's queries, which the eager model computes); then one
    # 40-token prompt, past index_topk (16): the graph's scored branch
    for seqs, length in ((1, 2), (6, 14), (1, 40)):
        cache_a, cache_b = runner.new_cache(num_blocks=64), runner.new_cache(num_blocks=64)
        chunks = [SeqChunk(list(range(40 + s, 40 + s + length)), 0, list(range(10 * s, 10 * s + 10))) for s in range(seqs)]
        with torch.inference_mode():
            a = runner(build_step_batch(chunks, 4, cache_a.pad_slot, max_blocks=runner.max_blocks), cache_a)
            b = eager_model(build_step_batch(chunks, 4, cache_b.pad_slot, max_blocks=runner.max_blocks), cache_b)
        # bf16 rounding of fused ops; a token whose router scores nearly tie may pick another expert
        # in the two runs (measured: 1 row of 14, before and after the dense experts existed)
        row_err = (a.float() - b.float()).abs().amax(1)
        assert (row_err > 0.05 * b.float().abs().max()).sum() <= max(1, len(row_err) // 10), row_err
        assert row_err.median() < 0.02 * b.float().abs().max()


def test_the_indexers_short_branch_selects_what_its_scores_select(tiny_dir):
    """Ops.indexer_skips_short: where no token sees more than index_topk keys, the branch a CPU's
    graphs take without queries or scores selects what the scored top-k selects (all visible keys),
    in position order; past index_topk the op scores."""
    model = build_model(tiny_dir, dtype=torch.float32)
    layer = next(i for i in range(model.config.num_hidden_layers) if model.config.layer_has_indexer(i))
    indexer, topk = model.layers[layer].self_attn.indexer, model.config.index_topk
    cache = KVCache(model.config, 24, 4, torch.float32, "cpu")
    cache.index_k[layer].normal_()
    chunks = [SeqChunk([5] * 3, 0, [0, 1]), SeqChunk([6], topk - 1, [2, 3, 4, 5]), SeqChunk([7], topk + 5, list(range(6, 12)))]
    b = build_step_batch(chunks, 4, cache.pad_slot)
    x, q_latent = torch.randn(5, model.config.hidden_size), torch.randn(5, model.config.q_lora_rank)
    cos, sin = model.rope_cos[b.positions], model.rope_sin[b.positions]
    args = (x, q_latent, cos, sin, cache.index_k[layer], b.block_tables, b.seq_ids, b.positions)
    scored, short = indexer._scored_topk(*args), indexer._all_visible(*args)
    assert short.dtype == scored.dtype == torch.int32 and short.shape == scored.shape == (5, topk)
    for row in range(4):  # positions 0, 1, 2 and topk - 1: every visible key, in order
        visible = int(b.positions[row]) + 1
        assert short[row].tolist() == list(range(visible)) + [-1] * (topk - visible)
        assert sorted(scored[row].tolist()) == sorted(short[row].tolist())
    assert (scored[4] >= 0).all() and len(set(scored[4].tolist())) == topk  # topk + 6 visible: scored


@pytest.mark.skipif(not cpu_kernels.has_avx512_bf16(), reason="blocked weights need AVX512-BF16")
def test_blocked_weights_compute_what_the_reference_computes(tiny_dir):
    """A model whose weights were blocked at load (the CPU BF16 ops: experts, linears, MLA's absorbed
    projections) gives the reference ops' BF16 step, eagerly, to bf16 rounding."""
    blocked = build_model(tiny_dir, dtype=torch.bfloat16, ops=ops_for("cpu", "bfloat16")[0])
    plain = build_model(tiny_dir, dtype=torch.bfloat16)
    assert blocked.layers[1].self_attn.w_uk_t is not None and plain.layers[1].self_attn.w_uk_t is None
    chunks = [SeqChunk(list(range(40 + s, 54 + s)), 0, list(range(4 * s, 4 * s + 4))) for s in range(3)]
    outs = []
    for model in (blocked, plain):
        cache = KVCache(model.config, 16, 4, torch.bfloat16)
        with torch.inference_mode():
            outs.append(model(build_step_batch(chunks, 4, cache.pad_slot), cache).float())
    row_err = (outs[0] - outs[1]).abs().amax(1)
    scale = outs[1].abs().max()
    assert row_err.median() < 0.02 * scale and (row_err > 0.05 * scale).sum() <= len(row_err) // 10, row_err


def test_fp8_index_cache_graphs(tiny_dir, tmp_path):
    """Artifacts built for an FP8 indexer key cache record it, make caches of it, equal the eager
    step with the same cache, and refuse a cache of another index dtype."""
    out = tmp_path / "fp8-index"
    manifest = compile_artifacts(tiny_dir, out, Buckets((2,)), block_size=4, max_model_len=64, fp8_index_cache=True,
                                 progress=lambda _: None)  # fmt: skip
    assert manifest.index_cache_dtype == "float8_e4m3fn"
    runner = LLM(tiny_dir, artifacts=out).runner
    cache_a, cache_b = runner.new_cache(num_blocks=8), runner.new_cache(num_blocks=8)
    assert cache_a.index_k[0].dtype == torch.float8_e4m3fn
    chunks = [SeqChunk([40, 41], 0, [3, 5])]
    with torch.inference_mode():
        a = runner(build_step_batch(chunks, 4, cache_a.pad_slot, max_blocks=runner.max_blocks), cache_a)
        b = runner.model(build_step_batch(chunks, 4, cache_b.pad_slot, max_blocks=runner.max_blocks), cache_b)
    assert (a - b).abs().max() < 1e-5
    plain = KVCache(runner.model.config, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="the artifacts read torch.float8_e4m3fn"):
        runner(build_step_batch(chunks, 4, plain.pad_slot, max_blocks=runner.max_blocks), plain)


def test_a_step_reads_keys_only_as_far_as_its_longest_sequence(compiled):
    """Block tables reach the graph as wide as the step's longest sequence needs (at least
    min_table_blocks): the result equals a full-width table's."""
    runner = compiled.runner
    assert runner.manifest.min_table_blocks == 4  # tiny: index_topk 16 over blocks of 4
    chunks = [SeqChunk([40, 41, 42, 43], 16, [0, 1, 2, 3, 4])]  # positions 16..19 in 5 blocks
    out = []
    for max_blocks in (None, runner.max_blocks):  # 5 columns, then all 32
        cache = runner.new_cache(num_blocks=8)
        with torch.inference_mode():
            out.append(runner(build_step_batch(chunks, 4, cache.pad_slot, max_blocks=max_blocks), cache))
    assert (out[0] - out[1]).abs().max() < 1e-5
