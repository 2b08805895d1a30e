"""tools/make_tokenizer.py and tools/make_tiny_checkpoint.py: the stand-in GLM-5 tokenizer and the
small random checkpoints, in true Hugging Face layout, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from glm5c.config import ModelConfig
from glm5c.tools.make_tiny_checkpoint import make_checkpoint
from glm5c.tools.make_tokenizer import EOS_TOKENS, MARKER_TOKENS, RESERVED_TOKENS, SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _shard_keys(ckpt: Path) -> dict[str, list[str]]:
    keys = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            keys[shard.name] = list(f.keys())
    return keys


# ---- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_loads_with_autotokenizer(tokenizer, tiny_dir):
    assert tokenizer.is_fast and tokenizer.name_or_path == str(tiny_dir)
    assert len(tokenizer) <= 2048
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("token", RESERVED_TOKENS)
def test_special_tokens_are_single_ids(tokenizer, token):
    """Every GLM control token and marker encodes to one id (its position in the reserved list),
    also inside text."""
    tid = RESERVED_TOKENS.index(token)
    assert tokenizer.encode(token, add_special_tokens=False) == [tid]
    ids = tokenizer.encode(f"ab{token}cd", add_special_tokens=False)
    assert ids.count(tid) == 1 and len(ids) >= 3


def test_decode_skips_specials_but_keeps_markers(tokenizer):
    """skip_special_tokens drops control tokens but keeps the reasoning/tool markers, as GLM does."""
    ids = tokenizer.encode("<|user|><think>plan</think>answer<|endoftext|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>plan</think>answer"
    assert set(MARKER_TOKENS) <= set(tokenizer.get_added_vocab())
    assert "<think>" not in tokenizer.all_special_tokens and "<|user|>" in tokenizer.all_special_tokens


def test_plain_text_round_trips(tokenizer):
    text = "def f(x):\n    return x + 1  # Hello, world!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("thinking, suffix", [(True, "<think>"), (False, "</think>")])
def test_chat_template_generation_prompt(tokenizer, thinking, suffix):
    """GLM-5's prompt shape: [gMASK]<sop><|user|>TEXT<|assistant|> then <think> (or </think> without thinking)."""
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert text == "[gMASK]<sop><|user|>What is 2+2?<|assistant|>" + suffix


def test_chat_template_with_system_and_history(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|></think>Hello!<|user|>Bye<|assistant|><think>"


def test_config_eos_ids_are_the_tokenizers(tiny_dir, tokenizer):
    """config.json's eos ids are <|endoftext|>, <|user|>, <|observation|> (GLM-5's), its pad <|endoftext|>."""
    config = json.loads((tiny_dir / "config.json").read_text())
    expected = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert list(EOS_TOKENS) == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert config["eos_token_id"] == expected
    assert config["pad_token_id"] == tokenizer.pad_token_id == expected[0]
    assert ModelConfig.from_model_dir(tiny_dir).eos_token_ids == tuple(expected)


def test_build_tokenizer_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        build_tokenizer(tmp_path, vocab_size=len(SPECIAL_TOKENS) + 10)


# ---- checkpoint ----------------------------------------------------------------------------------


def test_checkpoint_is_deterministic(tmp_path):
    """The same seed writes the same bytes in every file; another seed changes the weights only."""
    first = make_checkpoint(tmp_path / "first", "tiny", seed=0)
    second = make_checkpoint(tmp_path / "second", "tiny", seed=0)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)
    names = sorted(p.name for p in first.iterdir())
    assert "config.json" in names and "tokenizer.json" in names
    assert sorted(p.name for p in second.iterdir()) == names
    assert sorted(p.name for p in other.iterdir()) == names
    assert [n for n in names if (second / n).read_bytes() != (first / n).read_bytes()] == []
    shards = [n for n in names if n.endswith(".safetensors")]
    assert [n for n in names if (other / n).read_bytes() != (first / n).read_bytes()] == shards


def test_checkpoint_hf_layout(tiny_dir):
    """Sharded safetensors with an index, per-expert tensors, the MTP layer at index num_hidden_layers."""
    config = ModelConfig.from_model_dir(tiny_dir)
    n = config.num_hidden_layers
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shard_keys = _shard_keys(tiny_dir)
    assert len(shard_keys) >= 3
    assert set(weight_map.values()) == set(shard_keys)
    assert {k: f for f, ks in shard_keys.items() for k in ks} == weight_map

    for e in range(config.n_routed_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.weight" in weight_map
            assert f"model.layers.{n}.mlp.experts.{e}.{proj}.weight" in weight_map
    assert not [k for k in weight_map if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    assert "model.layers.0.mlp.gate_proj.weight" in weight_map  # the dense layer
    assert "model.layers.2.self_attn.indexer.wk.weight" not in weight_map  # the shared-indexer layer
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "self_attn.indexer.wk.weight", "mlp.gate.e_score_correction_bias"):  # fmt: skip
        assert f"model.layers.{n}.{name}" in weight_map
    assert not [k for k in weight_map if k.startswith(f"model.layers.{n + 1}.")]
    with safe_open(tiny_dir / weight_map[f"model.layers.{n}.eh_proj.weight"], framework="pt") as f:
        assert f.get_slice(f"model.layers.{n}.eh_proj.weight").get_shape() == [64, 128]


def test_checkpoint_config_accepted_by_transformers(tiny_dir):
    """transformers' GlmMoeDsaConfig reads config.json with the main model's layer patterns."""
    from transformers import GlmMoeDsaConfig

    ours = ModelConfig.from_model_dir(tiny_dir)
    theirs = GlmMoeDsaConfig.from_pretrained(tiny_dir)
    assert theirs.model_type == "glm_moe_dsa"
    assert theirs.num_hidden_layers == ours.num_hidden_layers == 4
    assert list(theirs.indexer_types) == list(ours.indexer_types) == ["full", "full", "shared", "full"]
    assert list(theirs.mlp_layer_types) == list(ours.mlp_layer_types)
    assert theirs.n_group == ours.n_group == 2
    assert ours.dtype == "float32"


def test_make_checkpoint_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        make_checkpoint(tmp_path, "tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
