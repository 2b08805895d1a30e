"""`glm5c bench`: the metric logic on timelines with known answers, and both subcommands end to
end on the tiny checkpoint (JSON with every documented field, valid PNGs, clear errors)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from glm5c.bench.metrics import SLO, RequestTimeline, percentile, std, summarize
from glm5c.bench.serve import arrival_gaps_s
from glm5c.ops import cpu_kernels

GLM5C = [sys.executable, "-m", "glm5c.cli"]


# ---- metrics ---------------------------------------------------------------------------------------
def test_percentile_and_std_match_numpy_definitions():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5 and percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 90) == pytest.approx(3.7) and percentile(values, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))
    assert std([1.0, 3.0]) == 1.0  # population std, numpy's default


def _timeline(sent, chunks, end, prompt=10, error=""):
    return RequestTimeline(sent, prompt, [t for t, _ in chunks], [n for _, n in chunks], end, error)


def test_ttft_tpot_itl_e2el_throughput_and_goodput_on_a_known_timeline():
    a = _timeline(0.0, [(0.1, 1), (0.2, 1), (0.4, 2)], 0.4)  # 4 tokens; ttft 100 ms; tpot (400-100)/3 = 100 ms
    b = _timeline(1.0, [(1.5, 1), (1.6, 1)], 1.6, prompt=20)  # 2 tokens; ttft 500 ms; tpot 100 ms
    c = _timeline(0.5, [(0.55, 1)], 0.55)  # 1 token: no tpot, no itl
    failed = _timeline(0.0, [(0.3, 1)], None, error="unavailable: boom")
    slo = SLO(ttft_ms=200, tpot_ms=150)
    r = summarize([a, b, c, failed], duration_s=2.0, percentiles=(50, 99), slo=slo)
    assert (r["completed"], r["failed"]) == (3, 1)
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (40, 7)
    assert r["request_throughput"] == 1.5 and r["output_throughput"] == 3.5 and r["total_token_throughput"] == 23.5
    assert r["request_goodput"] == 1.0  # a and c meet both objectives; b's TTFT does not
    assert r["mean_ttft_ms"] == pytest.approx((100 + 500 + 50) / 3) and r["median_ttft_ms"] == pytest.approx(100)
    assert r["mean_tpot_ms"] == pytest.approx(100) and r["p99_tpot_ms"] == pytest.approx(100)
    assert r["mean_itl_ms"] == pytest.approx((100 + 200 + 100) / 3) and r["median_itl_ms"] == pytest.approx(100)
    assert r["mean_e2el_ms"] == pytest.approx((400 + 600 + 50) / 3) and r["p50_e2el_ms"] == pytest.approx(400)
    assert r["mean_tokens_per_chunk"] == pytest.approx(7 / 6)
    assert summarize([a], 1.0)["request_goodput"] is None  # no SLOs given


def test_slo_parsing_and_arrival_gaps():
    assert SLO.parse(["ttft:200", "e2el:1e4"]) == SLO(ttft_ms=200.0, e2el_ms=1e4)
    for bad in (["ttft"], ["latency:5"], ["tpot:fast"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            SLO.parse(bad)
    assert arrival_gaps_s(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]
    gaps = arrival_gaps_s(20000, 50.0, 1.0, 0)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.03)  # Poisson: mean gap 1/rate
    bursty = arrival_gaps_s(20000, 50.0, 0.25, 0)
    assert sum(bursty) / len(bursty) == pytest.approx(1 / 50, rel=0.05) and std(bursty) > 1.5 * std(gaps)


# ---- end to end --------------------------------------------------------------------------------
def _png_ok(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + 3 * width)
    return width, height


LATENCY_FIELDS = ("avg_latency", "latencies", "percentiles", "date", "machine", "git_commit", "command", "mode", "batch_size", "input_len", "output_len",
                  "prefill_ms", "decode_step_ms", "output_tokens_per_s", "roofline")  # fmt: skip


def test_bench_latency_end_to_end_with_transformers_baseline(tiny_dir, tmp_path):
    out = tmp_path / "latency.json"
    run = subprocess.run(GLM5C + ["bench", "latency", "--model", str(tiny_dir), "--batch-size", "2", "--input-len", "8",
                                  "--output-len", "5", "--num-iters-warmup", "1", "--num-iters", "2",
                                  "--baseline", "transformers", "--output-json", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert all(field in result for field in LATENCY_FIELDS)
    assert len(result["latencies"]) == 2 and set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert result["mode"] == "eager" and sum(s["steps"] for s in result["decode_step_ms"].values()) == 2 * 4
    assert result["roofline"]["bytes"] > 0 and 0 < result["roofline"]["floor_over_step"]
    assert result["baseline"]["name"] == "transformers" and result["baseline"]["speedup"] > 0
    assert len(result["baseline"]["latencies"]) == 2 and result["interleaved"]
    assert len(result["roofline"]["read_bandwidth_probes_GBps"]) == 2
    assert "transformers generate" in run.stdout and "decode step" in run.stdout
    assert result["command"].startswith("glm5c bench latency --model")


def test_bench_latency_compiled_against_eager(tiny_dir, tiny_artifacts, tmp_path):
    out = tmp_path / "latency.json"
    run = subprocess.run(GLM5C + ["bench", "latency", "--model", str(tiny_dir), "--artifacts", str(tiny_artifacts),
                                  "--batch-size", "3", "--input-len", "4", "--output-len", "3", "--num-iters", "1",
                                  "--eager", "--output-json", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    # 3 decodes run in bucket 4; the prefill (4 tokens a step: the largest bucket) staggers them, so the
    # last requests finish in steps of their own, in bucket 1
    assert result["mode"] == "compiled" and "4" in result["decode_step_ms"] and set(result["decode_step_ms"]) <= {"1", "4"}
    assert result["eager"]["speedup"] > 0


def test_bench_engine_runs_compiled_and_mtp(tiny_dir, tiny_artifacts, tmp_path):
    """bench/bench_engine.py on the tiny model: throughput against transformers, and MTP eager and
    compiled (the drafter on the MTP layer's graphs), with the cost split of a speculative step."""
    out = tmp_path / "engine.json"
    run = subprocess.run([sys.executable, "-m", "glm5c.bench.bench_engine", "--model", str(tiny_dir), "--artifacts",
                          str(tiny_artifacts), "--concurrency", "2", "--new-tokens", "4", "--repeats", "1", "--mtp", "2",
                          "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rows"][0]["compiled"]["tok_s"] > 0 and report["rows"][0]["eager"]["vs_transformers"] > 0
    probes = report["read_bandwidth_probes_GBps"]  # either side of the row's runs; its floor on the faster
    assert len(probes) == 2 and report["rows"][0]["read_bandwidth_GBps"] == pytest.approx(max(probes), abs=0.06)
    for name in ("eager", "compiled"):
        m = report["mtp"][name]
        assert m["k"] == 2 and m["mean_accept_length"] >= 1 and m["draft_ms"] > 0 and m["break_even_accept_length"] > 0
        assert m["oracle_mean_accept_length"] > 2.5  # always-right drafts: (nearly) k + 1 tokens a verify step
    assert "MTP k=2, compiled" in run.stdout


def test_ab_artifacts_interleaves_two_directories(tiny_dir, tiny_artifacts, tmp_path):
    """bench/ab_artifacts.py: engines over two artifact directories in one process, rounds
    alternating; each gets its median decode step and its ratio to the first."""
    out = tmp_path / "ab.json"
    run = subprocess.run([sys.executable, "-m", "glm5c.bench.ab_artifacts", str(tiny_artifacts), str(tiny_artifacts),
                          "--model", str(tiny_dir), "--batch", "2", "--rounds", "2", "--new-tokens", "4",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and runs[0]["vs_first"] == 1.0 and runs[1]["decode_step_ms"] > 0
    assert all(len(r["round_steps_ms"]) == 2 for r in runs)
    bad = subprocess.run([sys.executable, "-m", "glm5c.bench.ab_artifacts", str(tiny_artifacts)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "two or more" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "glm5c.bench.ab_artifacts", str(tiny_artifacts), str(tmp_path),
                              "--model", str(tiny_dir)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode == 2 and "not a glm5c artifact directory" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("argv,message", [(["--input-len", "0"], "--input-len must be >= 1"),
                                          (["--batch", "4", "0"], "--batch sizes must be >= 1")])  # fmt: skip
def test_bench_compile_bad_flags(argv, message):
    run = subprocess.run([sys.executable, "bench/bench_compile.py", *argv], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("script", ["bench/moe_kernels.py", "bench/dsa_kernels.py"])
def test_kernel_benches_smoke_run(script):
    """The GPU kernel benchmarks' own code path, small and under Triton's interpreter, so that it
    does not rot between device runs (a stale kernel call once waited for a GPU to fail)."""
    run = subprocess.run([sys.executable, script, "--interpret", "--small"], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_bench_compile_runs(tiny_dir, tmp_path):
    """bench/bench_compile.py on the tiny model: a cold compile of one bucket (and its MTP graph),
    a fresh start from the artifacts with no compilation, and decode steps with every request in."""
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, "bench/bench_compile.py", "--model", str(tiny_dir), "--buckets", "4",
                          "--max-model-len", "64", "--batch", "1", "3", "--new-tokens", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["compilations_at_load"] == 0 and list(report["mtp_compile_s_per_bucket"]) == ["4"]
    assert [r["batch"] for r in report["decode"]] == [1, 3] and all(r["compiled_step_ms"] > 0 for r in report["decode"])


SERVE_FIELDS = ("date", "machine", "git_commit", "command", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency",
                "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
                "input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors", "mean_tokens_per_chunk",
                *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99")))  # fmt: skip


def test_bench_serve_launches_a_server_sweeps_and_plots(tiny_dir, tmp_path):
    run = subprocess.run(GLM5C + ["bench", "serve", "--launch", "--model", str(tiny_dir), "--num-prompts", "6",
                                  "--random-input-len", "8", "--random-output-len", "4", "--random-range-ratio", "0.5",
                                  "--concurrency-sweep", "1,3", "--ignore-eos", "--goodput", "ttft:60000",
                                  "--save-result", "--result-dir", str(tmp_path), "--result-filename", "run.json"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Serving Benchmark Result" in run.stdout and "Median TPOT (ms)" in run.stdout
    for c in (1, 3):
        result = json.loads((tmp_path / f"run-c{c}.json").read_text())
        missing = [f for f in SERVE_FIELDS if f not in result]
        assert not missing, missing
        assert result["max_concurrency"] == c and result["completed"] == 6 and result["failed"] == 0
        assert result["total_output_tokens"] == sum(result["output_lens"]) and all(2 <= n <= 6 for n in result["output_lens"])
        assert result["request_goodput"] == pytest.approx(result["request_throughput"])
        assert result["roofline"]["decode_step_floor_ms"] > 0
    for name in ("ttft-cdf", "e2el-cdf", "throughput", "tpot"):
        assert _png_ok(tmp_path / f"run-{name}.png") == (640, 420)


def test_bench_serve_jsonl_dataset_against_a_running_server(tiny_dir, tmp_path):
    from glm5c.serve.launcher import ServerProcess

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Hello there", "max_tokens": 3}\n\n'
                    '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}\n')  # fmt: skip
    with ServerProcess(["--model", str(tiny_dir), "--port", "0"], 180) as server:
        run = subprocess.run(GLM5C + ["bench", "serve", "--address", server.address, "--dataset-name", "jsonl",
                                      "--dataset-path", str(data), "--num-prompts", "4", "--request-rate", "20",
                                      "--ignore-eos", "--save-result", "--result-dir", str(tmp_path), "--no-plots",
                                      "--result-filename", "j.json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "j.json").read_text())
    assert result["completed"] == 4 and result["output_lens"] == [3, 2, 3, 2] and result["request_rate"] == 20
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["serve", "--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["serve", "--request-rate", "-2"], "--request-rate must be > 0"),
        (["serve", "--concurrency-sweep", "1,x"], "--concurrency-sweep must be integers"),
        (["serve", "--dataset-name", "jsonl"], "needs --dataset-path"),
        (["serve", "--goodput", "speed:3"], "--goodput"),
        (["serve", "--metric-percentiles", "50,100"], "--metric-percentiles"),
        (["serve", "--address", "tcp://127.0.0.1:9"], "cannot reach a glm5c server at tcp://127.0.0.1:9"),
        (["latency", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["latency", "--eager"], "--eager compares"),
        (["latency", "--artifacts", "/nonexistent"], "no manifest.json"),
        (["latency", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_and_unreachable_server_give_clear_errors(flags, message):
    run = subprocess.run(GLM5C + ["bench", *flags], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_cpu_graph_ops_ablation_runs(tiny_dir, tmp_path):
    """bench/cpu_graph_ops.py on the tiny model: one bucket, the chosen ops and one alternative
    (with AVX512-BF16: blocked expert stacks against [E, out, in] ones, a model for each)."""
    out = tmp_path / "ops.json"
    run = subprocess.run([sys.executable, "-m", "glm5c.bench.cpu_graph_ops", "--model", str(tiny_dir), "--buckets", "2",
                          "--variants", "chosen", "experts: kernel, unblocked stacks", "--rounds", "1", "--steps", "2", "--context", "8",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["bucket"], r["variant"]) for r in rows] == [(2, "chosen"), (2, "experts: kernel, unblocked stacks")]
    assert all(r["step_ms"] > 0 for r in rows) and "| 2 | " in run.stdout


@pytest.mark.parametrize("argv,message", [
    (["--rounds", "0"], "--rounds must be >= 1"), (["--buckets", "0"], "--buckets must be >= 1"),
    (["--model", "/nonexistent"], "no config.json there"), (["--variants", "bogus"], "invalid choice: 'bogus'"),
])  # fmt: skip
def test_cpu_graph_ops_bad_input(argv, message):
    run = subprocess.run([sys.executable, "-m", "glm5c.bench.cpu_graph_ops", *argv], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_bench_serve_overhead_bad_artifacts():
    run = subprocess.run([sys.executable, "bench/bench_serve_overhead.py", "--artifacts", "/nonexistent"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert run.returncode == 2 and "no manifest.json there" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.skipif(not cpu_kernels.has_avx512_bf16(), reason="blocked weights need AVX512-BF16")
def test_step_floor_counts_the_bytes_a_step_reads_in_any_layout(tiny_dir):
    """Weights blocked at load read as many bytes; MLA's absorbed copies replace kv_b_proj in a step
    (which then reads only the copies), so the floor is the unblocked model's."""
    from glm5c.bench.roofline import step_floor_bytes
    from glm5c.graphs.compile import ops_for
    from glm5c.weights import build_model

    plain = build_model(tiny_dir, dtype=torch.bfloat16)
    blocked = build_model(tiny_dir, dtype=torch.bfloat16, ops=ops_for("cpu", "bfloat16")[0])
    assert blocked.layers[0].self_attn.w_uk_t is not None
    assert step_floor_bytes(blocked, 4, 100) == step_floor_bytes(plain, 4, 100)
