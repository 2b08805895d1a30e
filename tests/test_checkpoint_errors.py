"""glm5c/weights.py: broken checkpoints fail with a CheckpointError naming the problem, before any
memory is allocated; FP8 checkpoints load with their FP8 weights kept (or dequantized on request)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm5c.config import ConfigError
from glm5c.model import GLM5
from glm5c import weights
from glm5c.ops.fp8 import dequantize_weight_blocks
from glm5c.weights import INDEX_FILE, CheckpointError, build_model, read_checkpoint_index

KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.fixture
def ckpt(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to break."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if build_model gets as far as allocating or filling the model's memory."""

    def refuse(*args, **kwargs):
        raise AssertionError("build_model allocated the model before finding the error")

    monkeypatch.setattr(GLM5, "to_empty", refuse)
    for step in ("_materialize", "_fill"):
        if hasattr(weights, step):
            monkeypatch.setattr(weights, step, refuse)


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / INDEX_FILE).read_text())


def _write_index(ckpt: Path, index: dict) -> None:
    (ckpt / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _rewrite_shard(ckpt: Path, tensor: str, change) -> None:
    """Load the shard holding `tensor`, let `change(tensors)` edit the dict, save it back."""
    shard = ckpt / _index(ckpt)["weight_map"][tensor]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        build_model(path)
    return str(info.value)


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_intact_copy_loads(ckpt):
    """Control: the unbroken copy loads, so the failures below come from the breakage."""
    model = build_model(ckpt)
    assert model.layers[1].self_attn.kv_b_proj.weight.shape == (4 * 32, 32)


def test_missing_shard(ckpt, no_allocation):
    shard = _index(ckpt)["weight_map"][KV_B]
    (ckpt / shard).unlink()
    msg = _load_error(ckpt)
    assert "missing" in msg and shard in msg


def test_missing_tensor(ckpt, no_allocation):
    """A tensor absent from its shard and the index is reported by name."""
    _rewrite_shard(ckpt, KV_B, lambda t: t.pop(KV_B))
    index = _index(ckpt)
    del index["weight_map"][KV_B]
    _write_index(ckpt, index)
    msg = _load_error(ckpt)
    assert "missing tensors: " + KV_B in msg
    assert "unexpected" not in msg


def test_tensor_listed_in_index_but_absent_from_shard(ckpt):
    _rewrite_shard(ckpt, KV_B, lambda t: t.pop(KV_B))
    with pytest.raises(CheckpointError, match=f"names tensors its shards do not hold: {KV_B}"):
        read_checkpoint_index(ckpt)


def test_wrong_shape(ckpt, no_allocation):
    """The message names the tensor, its shape in the checkpoint and the expected shape."""
    _rewrite_shard(ckpt, KV_B, lambda t: t.__setitem__(KV_B, torch.zeros(128, 31)))
    msg = _load_error(ckpt)
    assert f"{KV_B} has shape [128, 31], expected [128, 32]" in msg


def test_wrong_expert_shape(ckpt, no_allocation):
    """Per-expert tensors are checked against one slice of the stacked parameter."""
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    _rewrite_shard(ckpt, name, lambda t: t.__setitem__(name, torch.zeros(64, 33)))
    assert f"{name} has shape [64, 33], expected [64, 32]" in _load_error(ckpt)


def test_unexpected_tensor(ckpt, no_allocation):
    extra = "model.layers.1.self_attn.rotary_emb.inv_freq"
    _rewrite_shard(ckpt, KV_B, lambda t: t.__setitem__(extra, torch.ones(4)))
    index = _index(ckpt)
    index["weight_map"][extra] = index["weight_map"][KV_B]
    _write_index(ckpt, index)
    msg = _load_error(ckpt)
    assert "unexpected tensors: " + extra in msg
    assert "missing" not in msg


def test_pickle_weights_only(tiny_dir, tmp_path):
    """A directory with only pytorch_model.bin is refused: safetensors only, never pickles."""
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    msg = _load_error(tmp_path)
    assert "no *.safetensors weights" in msg
    assert "pytorch_model.bin" in msg and "safetensors only" in msg


def test_garbage_safetensors_file(ckpt):
    shard = _index(ckpt)["weight_map"][KV_B]
    (ckpt / shard).write_bytes(b"\x00garbage" * 100)
    msg = _load_error(ckpt)
    assert shard in msg and "not a readable safetensors file" in msg


def test_garbage_safetensors_without_index(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"garbage!" * 10)
    msg = _load_error(tmp_path)
    assert "model.safetensors is not a readable safetensors file" in msg


def test_index_not_json(ckpt):
    (ckpt / INDEX_FILE).write_text("{not json")
    assert "is not a valid safetensors index" in _load_error(ckpt)


def test_other_model_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "deepseek_v3"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'deepseek_v3'"):
        build_model(ckpt)


def test_nonexistent_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"model directory {missing} does not exist"):
        read_checkpoint_index(missing)
    with pytest.raises(CheckpointError, match=f"model directory {missing} does not exist"):
        build_model(missing)


# ---- FP8 ------------------------------------------------------------------------------------------


def test_fp8_weights_kept(tiny_fp8_dir):
    """FP8 linears stay float8_e4m3fn with their block scales; kv_b_proj is dequantized to fp32."""
    model = build_model(tiny_fp8_dir)
    attn = model.layers[1].self_attn
    assert attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert attn.q_a_proj.weight_scale_inv.dtype == torch.float32
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert attn.kv_b_proj.weight_scale_inv is None
    assert model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    assert model.embed_tokens.weight.dtype == torch.float32  # left unquantized


def test_fp8_kv_b_proj_bit_exact(tiny_fp8_dir):
    """The loaded kv_b_proj is exactly dequantize_weight_blocks of the checkpoint's fp8 weight and scale."""
    model = build_model(tiny_fp8_dir)
    shard = json.loads((tiny_fp8_dir / INDEX_FILE).read_text())["weight_map"][KV_B]
    with safe_open(tiny_fp8_dir / shard, framework="pt") as f:
        w, s = f.get_tensor(KV_B), f.get_tensor(KV_B + "_scale_inv")
    assert w.dtype == torch.float8_e4m3fn
    expected = dequantize_weight_blocks(w, s, torch.float32)
    assert torch.equal(model.layers[1].self_attn.kv_b_proj.weight, expected)


def test_fp8_keep_fp8_false(tiny_fp8_dir):
    """keep_fp8=False dequantizes everything: no fp8 parameter and no block scale is left."""
    model = build_model(tiny_fp8_dir, keep_fp8=False)
    names = [n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn or "scale_inv" in n]
    assert names == []
    assert model.layers[1].self_attn.q_a_proj.weight.dtype == torch.float32


def test_fp8_config_maps_the_misspelt_indexer_name():
    from glm5c.config import FP8Config

    q = FP8Config(modules_to_not_convert=("lm_head", "model.layers.3.self_attn.indexers_proj"))
    assert q.unconverted_modules() == ("lm_head", "model.layers.3.self_attn.indexer.weights_proj")


def test_fp8_tensor_in_an_unconverted_module_is_refused(tiny_fp8_dir, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_fp8_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].append("model.layers.1.self_attn.q_a_proj")
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"listed in modules_to_not_convert: model\.layers\.1\.self_attn\.q_a_proj\.weight"):
        build_model(broken)


def test_fp8_tensors_without_quantization_config_are_refused(tiny_fp8_dir, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_fp8_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["quantization_config"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        build_model(broken)
