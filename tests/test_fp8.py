"""Tests for ops/fp8.py (FP8 block quantization) and tools/quantize_fp8.py (BF16 -> GLM-5-FP8).

Error bounds used below (e4m3fn: 3 mantissa bits, smallest normal 2^-6, subnormal step 2^-9).
A value v scaled into fp8 range and rounded to nearest has
    |fp8(v) - v| <= 2^-4 * |v|   if |v| >= 2^-6   (half an ulp; the ulp is 2^-3 of the binade)
    |fp8(v) - v| <= 2^-10        if |v| <  2^-6   (half the subnormal step)
so with v = w / s, the dequantized value is off by at most  E(w) = 2^-4 |w| + 2^-10 s,  plus fp32
rounding in w / s and q * s (a few 2^-24 relative, covered by a 2^-20 * amax slack). In a block
|v| <= 448 < 512, whose binade [256, 512) has ulp 32, so no scaled error exceeds 16: every error
in a block is <= 16 s = amax / 28 (~0.0357 amax, tighter than amax * 2^-4; + slack).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
from glm5c.ops import fp8
from glm5c.tools import quantize_fp8

quantize_checkpoint = quantize_fp8.quantize_checkpoint

REL = 2.0**-4  # e4m3 half-ulp relative error for normal values
SUB = 2.0**-10  # e4m3 half subnormal step, in scaled units
SLACK = 2.0**-20  # fp32 rounding slack, relative to the block / group amax


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _block_scale(scale: torch.Tensor, n: int, k: int, block: int = 128) -> torch.Tensor:
    """scale [ceil(n/b), ceil(k/b)] -> per-element scale [n, k] by gather."""
    rows = torch.arange(n) // block
    cols = torch.arange(k) // block
    return scale[rows[:, None], cols[None, :]]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _random_fp8(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """All finite e4m3fn bit patterns (0x7f / 0xff are NaN)."""
    bits = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x7E
    return bits.view(fp8.FP8_DTYPE)


# ---------------------------------------------------------------- dequantize: bit exactness


@pytest.mark.parametrize("shape", [(300, 200), (256, 384), (128, 128), (1, 129), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_gather_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    n, k = shape
    w_fp8 = _random_fp8(n, k, g)
    scale = torch.exp2(torch.randint(-20, 5, (_ceil(n, 128), _ceil(k, 128)), generator=g).float())
    scale *= 1 + torch.rand(scale.shape, generator=g)  # non power-of-two scales: products round
    ref = (w_fp8.float() * _block_scale(scale, n, k)).to(dtype)
    out = fp8.dequantize_weight_blocks(w_fp8, scale, dtype)
    assert out.dtype == dtype and out.shape == (n, k)
    assert torch.equal(out, ref)


def test_dequantize_matches_per_element_loop():
    # Independent reference: a Python loop in float64. The product of two fp32 numbers is exact in
    # float64 (24 + 24 mantissa bits <= 53), so rounding it once to fp32 gives the fp32 product.
    g = torch.Generator().manual_seed(1)
    n, k = 300, 200
    w_fp8 = _random_fp8(n, k, g)
    scale = torch.rand(3, 2, generator=g) * 1e-2 + 1e-4
    vals, sc = w_fp8.float().tolist(), scale.tolist()
    ref = [[vals[i][j] * sc[i // 128][j // 128] for j in range(k)] for i in range(n)]
    ref32 = torch.tensor(ref, dtype=torch.float64).to(torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8.dequantize_weight_blocks(w_fp8, scale, dtype), ref32.to(dtype))


def test_dequantize_validates_shapes():
    w_fp8 = torch.zeros(300, 200, dtype=fp8.FP8_DTYPE)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(300, 200\).*\(3, 2\)"):
        fp8.dequantize_weight_blocks(w_fp8, torch.ones(2, 2), torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        fp8.dequantize_weight_blocks(torch.zeros(2, 3, 4, dtype=fp8.FP8_DTYPE), torch.ones(1, 1), torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.dequantize_weight_blocks(torch.zeros(300, 200), torch.ones(3, 2), torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_weight_blocks(torch.zeros(4))


# ---------------------------------------------------------------- quantize: round trip


@pytest.mark.parametrize("shape", [(300, 200), (256, 384), (1, 1), (129, 127)])
def test_weight_round_trip_error_bound(shape):
    g = torch.Generator().manual_seed(2)
    n, k = shape
    # Gaussian weights with per-row magnitudes spanning 2^-12 .. 2^4, some exact zeros, in bf16.
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-12, 5, (n, 1), generator=g).float())
    w[torch.rand(n, k, generator=g) < 0.05] = 0
    w = w.to(torch.bfloat16)

    w_fp8, scale = fp8.quantize_weight_blocks(w)
    assert w_fp8.dtype == fp8.FP8_DTYPE and w_fp8.shape == (n, k)
    assert scale.dtype == torch.float32 and scale.shape == (_ceil(n, 128), _ceil(k, 128))
    assert torch.isfinite(w_fp8.float()).all() and (scale > 0).all()

    wf = w.float()
    deq = fp8.dequantize_weight_blocks(w_fp8, scale, torch.float32)
    err = (deq - wf).abs()
    s = _block_scale(scale, n, k)
    amax = s * fp8.FP8_MAX
    # Per element: E(w) = 2^-4 |w| + 2^-10 s (+ fp32 slack).
    assert (err <= REL * wf.abs() + SUB * s + SLACK * amax).all()
    # Per block: no error exceeds amax_block / 28 (half an ulp of the top binade, 16 / 448).
    assert (err <= (1 / 28 + SLACK) * amax).all()
    # Zeros stay exactly zero; each block's largest element maps to +-448 and comes back ~exactly.
    assert (deq[wf == 0] == 0).all()
    at_max = wf.abs() == amax
    assert at_max.any() and (w_fp8.float()[at_max].abs() == fp8.FP8_MAX).all()
    # The bound is tight: normal-range relative errors come close to 2^-4 but never exceed it.
    normal = wf.abs() >= 2.0**-6 * s
    if normal.sum() > 1000:
        rel = err[normal] / wf.abs()[normal]
        assert 0.8 * REL < rel.max() <= REL * (1 + 1e-6)


def test_quantize_all_zero_block_and_scale_layout():
    w = torch.zeros(256, 256)
    w[:128, :128] = 3.0  # only block (0, 0) is non-zero
    w_fp8, scale = fp8.quantize_weight_blocks(w)
    assert scale[0, 0] == 3.0 / 448.0
    assert (scale[1:, :] > 0).all() and (scale[:, 1:] > 0).all()
    assert torch.equal(fp8.dequantize_weight_blocks(w_fp8, scale, torch.float32), w)


def test_act_groups_round_trip_and_shapes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 300, generator=g) * torch.exp2(torch.randint(-8, 8, (2, 3, 1), generator=g).float())
    x_fp8, scale = fp8.quantize_act_groups(x)
    assert x_fp8.shape == x.shape and x_fp8.dtype == fp8.FP8_DTYPE
    assert scale.shape == (2, 3, 3) and scale.dtype == torch.float32
    # Per-token groups: scale = amax over each group of 128 along the last dim / 448.
    amax = torch.stack([x[..., i : i + 128].abs().amax(-1) for i in (0, 128, 256)], -1)
    assert torch.equal(scale, amax / 448.0)
    deq = fp8.dequantize_act_groups(x_fp8, scale)
    s = scale.repeat_interleave(128, -1)[..., :300]
    assert ((deq - x).abs() <= REL * x.abs() + SUB * s + SLACK * 448 * s).all()
    with pytest.raises(ValueError, match="scale shape"):
        fp8.dequantize_act_groups(x_fp8, scale[..., :2])


# ---------------------------------------------------------------- fp8_linear


def _linear_bound(x: torch.Tensor, w: torch.Tensor, ex: torch.Tensor, ew: torch.Tensor) -> torch.Tensor:
    """|x'w'^T - xw^T| <= |x| ew^T + ex |w|^T + ex ew^T, plus fp32 GEMM rounding (~K 2^-24)."""
    xa, wa = x.abs().double(), w.abs().double()
    k = x.shape[-1]
    return xa @ ew.double().T + ex.double() @ wa.T + ex.double() @ ew.double().T + k * 2.0**-22 * (xa @ wa.T)


@pytest.mark.parametrize("quantize_activations", [False, True])
def test_fp8_linear_error_bound(quantize_activations):
    g = torch.Generator().manual_seed(4)
    n, k = 200, 300
    x = torch.randn(2, 5, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    w_fp8, scale = fp8.quantize_weight_blocks(w)
    y = fp8.fp8_linear(x, w_fp8, scale, quantize_activations=quantize_activations)
    assert y.shape == (2, 5, n) and y.dtype == x.dtype
    y_ref = x.double() @ w.double().T

    sw = _block_scale(scale, n, k)
    ew = REL * w.abs() + SUB * sw + SLACK * 448 * sw
    if quantize_activations:
        sx = fp8.quantize_act_groups(x)[1].repeat_interleave(128, -1)[..., :k]
        ex = REL * x.abs() + SUB * sx + SLACK * 448 * sx
    else:
        ex = torch.zeros_like(x)
    assert ((y.double() - y_ref).abs() <= _linear_bound(x, w, ex, ew)).all()
    # Typical error is far below the worst case. Per element the relative error is at most 2^-4 and
    # spread roughly uniformly, so its RMS is about 2^-4 / sqrt(3) ~ 3.6% (measured ~2.7% here);
    # independent errors add in quadrature, so quantizing both operands gives ~sqrt(2) times that.
    rel = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    assert rel < REL / 3**0.5 * (2**0.5 if quantize_activations else 1)

    # Without activation quantization the result is exactly x @ dequant(w).T in fp32.
    if not quantize_activations:
        w_deq = fp8.dequantize_weight_blocks(w_fp8, scale, torch.float32)
        torch.testing.assert_close(y, x @ w_deq.T, rtol=1e-6, atol=1e-6)


def test_fp8_linear_bf16_and_shape_errors():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 256, generator=g, dtype=torch.bfloat16)
    w_fp8, scale = fp8.quantize_weight_blocks(torch.randn(130, 256, generator=g))
    y = fp8.fp8_linear(x, w_fp8, scale)
    assert y.shape == (4, 130) and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(4, 255\).*\(130, 256\)"):
        fp8.fp8_linear(x[:, :255], w_fp8, scale)
    with pytest.raises(ValueError, match="scale_inv shape"):
        fp8.fp8_linear(x, w_fp8, scale[:1])


# ---------------------------------------------------------------- quantize_checkpoint

_CONFIG = {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa", "hidden_size": 160,
           "num_hidden_layers": 2, "num_nextn_predict_layers": 1, "dtype": "bfloat16"}

_QUANTIZED = {  # name -> shape; ragged shapes on purpose (e.g. 144 = 128 + 16)
    "model.layers.0.self_attn.q_a_proj.weight": (96, 160),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (144, 160),
    "model.layers.0.self_attn.indexer.wq_b.weight": (256, 96),
    "model.layers.0.self_attn.indexer.wk.weight": (128, 160),
    "model.layers.0.mlp.gate_proj.weight": (300, 160),
    "model.layers.1.mlp.experts.0.down_proj.weight": (160, 64),
    "model.layers.1.mlp.shared_experts.up_proj.weight": (64, 160),
    "model.layers.2.eh_proj.weight": (160, 320),
}
_KEPT = {
    "model.embed_tokens.weight": (50, 160),
    "model.layers.0.input_layernorm.weight": (160,),
    "model.layers.0.self_attn.indexer.weights_proj.weight": (8, 160),
    "model.layers.0.self_attn.indexer.k_norm.weight": (128,),
    "model.layers.0.self_attn.indexer.k_norm.bias": (128,),
    "model.layers.1.mlp.gate.weight": (4, 160),
    "model.layers.1.mlp.gate.e_score_correction_bias": (4,),
    "model.layers.2.embed_tokens.weight": (50, 160),
    "model.layers.2.shared_head.head.weight": (50, 160),
    "model.layers.2.shared_head.norm.weight": (160,),
    "model.norm.weight": (160,),
    "lm_head.weight": (50, 160),
}
_EXTRA = {"tokenizer.json": '{"model": {"type": "BPE"}}\n', "generation_config.json": '{"eos_token_id": 1}\n'}


def _tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    dtype = torch.float32 if name.endswith("correction_bias") else torch.bfloat16
    return torch.randn(shape, generator=g).to(dtype)


def _write_checkpoint(d: Path, sharded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    tensors = {n: _tensor(n, s, g) for n, s in {**_QUANTIZED, **_KEPT}.items()}
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_CONFIG))
    for name, text in _EXTRA.items():
        (d / name).write_text(text)
    if not sharded:
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return tensors
    shard_of = {n: "model-0000%d-of-00002.safetensors" % (1 if ".layers.1." not in n and ".layers.2." not in n else 2)
                for n in tensors}
    for shard in sorted(set(shard_of.values())):
        save_file({n: t for n, t in tensors.items() if shard_of[n] == shard}, d / shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": shard_of}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def _check_output(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checks shared by the sharded and single-file cases; returns tensor name -> shard file."""
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())
    for name, text in _EXTRA.items():
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    config = json.loads((dst / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == _CONFIG
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"]
        + [f"model.layers.{i}.self_attn.indexers_proj" for i in range(3)],
    }
    shard_of: dict[str, str] = {}
    for shard in dst.glob("*.safetensors"):
        src_names = set(load_file(src / shard.name))
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        out = load_file(shard)
        # Same tensor-to-shard assignment: each shard holds its source tensors (+ their scales).
        assert set(out) == src_names | {n + "_scale_inv" for n in src_names if n in _QUANTIZED}
        shard_of.update(dict.fromkeys(out, shard.name))
    assert set(shard_of) == set(tensors) | {n + "_scale_inv" for n in _QUANTIZED}
    out = {n: t for shard in dst.glob("*.safetensors") for n, t in load_file(shard).items()}
    for name, shape in _QUANTIZED.items():
        w_fp8, scale = out[name], out[name + "_scale_inv"]
        assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == shape
        assert scale.dtype == torch.float32 and scale.shape == (_ceil(shape[0], 128), _ceil(shape[1], 128))
        ref_fp8, ref_scale = fp8.quantize_weight_blocks(tensors[name])
        assert _bytes(w_fp8) == _bytes(ref_fp8) and torch.equal(scale, ref_scale)
    for name in _KEPT:
        assert out[name].dtype == tensors[name].dtype and _bytes(out[name]) == _bytes(tensors[name])
    return shard_of


def test_is_quantized_weight_names():
    yes = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "indexer.wq_b", "indexer.wk"]
    yes = [f"model.layers.3.self_attn.{m}.weight" for m in yes] + [
        "model.layers.3.mlp.experts.255.down_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.3.mlp.shared_experts.gate_proj.weight", "model.layers.78.eh_proj.weight"]
    no = ["model.embed_tokens.weight", "model.layers.78.embed_tokens.weight", "lm_head.weight",
          "model.layers.78.shared_head.head.weight", "model.layers.3.mlp.gate.weight",
          "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.3.self_attn.indexer.weights_proj.weight",
          "model.layers.3.self_attn.indexer.k_norm.weight", "model.layers.3.self_attn.q_a_layernorm.weight",
          "model.layers.3.self_attn.o_proj.weight_scale_inv", "model.layers.3.self_attn.wk.weight"]
    assert all(quantize_fp8.is_quantized_weight(n) for n in yes)
    assert not any(quantize_fp8.is_quantized_weight(n) for n in no)


def test_quantize_checkpoint_sharded(tmp_path):
    src, dst = tmp_path / "bf16", tmp_path / "fp8"
    tensors = _write_checkpoint(src)
    quantize_checkpoint(src, dst)
    shard_of = _check_output(src, dst, tensors)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == shard_of
    out = {n: t for shard in dst.glob("*.safetensors") for n, t in load_file(shard).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())


def test_quantize_checkpoint_single_file_cli(tmp_path):
    src, dst = tmp_path / "bf16", tmp_path / "fp8"
    tensors = _write_checkpoint(src, sharded=False)
    dst.mkdir()  # an existing empty dir is fine
    # Run as a script, the way users call it (also exercises the import fallback).
    subprocess.run([sys.executable, str(ROOT / "tools" / "quantize_fp8.py"), str(src), str(dst)],
                   check=True, capture_output=True)
    _check_output(src, dst, tensors)
    assert not (dst / "model.safetensors.index.json").exists()


def test_quantize_checkpoint_errors(tmp_path):
    src = tmp_path / "bf16"
    _write_checkpoint(src)

    with pytest.raises(FileNotFoundError, match="config.json"):
        quantize_checkpoint(tmp_path / "nowhere", tmp_path / "o1")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(_CONFIG))
    with pytest.raises(FileNotFoundError, match="no safetensors files"):
        quantize_checkpoint(empty, tmp_path / "o2")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        quantize_checkpoint(src, busy)

    # A checkpoint that is already FP8: by its config, or by its weight_scale_inv tensors.
    done = tmp_path / "done"
    quantize_checkpoint(src, done)
    with pytest.raises(ValueError, match="already"):
        quantize_checkpoint(done, tmp_path / "o3")
    config = json.loads((done / "config.json").read_text())
    del config["quantization_config"]
    (done / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight_scale_inv.*already FP8"):
        quantize_checkpoint(done, tmp_path / "o4")

    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        quantize_checkpoint(src, tmp_path / "o5")

    # Validation happens before anything is written.
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
