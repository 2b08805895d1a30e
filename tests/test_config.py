"""glm5c/config.py: presets, the real GLM-5 config files, derived per-layer patterns, and the
errors a config glm5c cannot serve raises."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from glm5c.config import ConfigError, FP8Config, ModelConfig, preset_hf_config
from glm5c.model import GLM5

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _param_counts(name: str) -> tuple[ModelConfig, GLM5, int, int]:
    """(config, meta model, main-model parameters, MTP parameters) of a preset."""
    config = ModelConfig.preset(name)
    with torch.device("meta"):
        model = GLM5(config)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    return config, model, total - mtp, mtp


def _assert_every_feature(config: ModelConfig, model: GLM5) -> None:
    assert "dense" in config.mlp_layer_types and "sparse" in config.mlp_layer_types
    assert "shared" in config.indexer_types
    assert config.n_group > 1 and config.topk_group < config.n_group
    assert config.num_nextn_predict_layers == 1 and model.mtp is not None
    shared = config.indexer_types.index("shared")
    assert model.layers[shared].self_attn.indexer is None
    assert model.layers[shared - 1].self_attn.indexer is not None


# ---- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "mini", "glm5"])
def test_presets_validate(name):
    """Every preset is a valid config of the GLM-5 architecture."""
    config = ModelConfig.preset(name)
    assert config.kv_cache_dim == config.kv_lora_rank + config.qk_rope_head_dim
    assert config.num_layers_with_mtp == config.num_hidden_layers + 1


def test_glm5_parameter_count():
    """The glm5 preset has GLM-5's size: 744B in the main model, ~9.95B in the MTP layer."""
    config, _, main, mtp = _param_counts("glm5")
    assert abs(main - 743.9e9) < 0.5e9, main
    assert abs(mtp - 9.95e9) < 0.05e9, mtp
    assert config.kv_cache_dim == 576 and config.qk_head_dim == 256
    assert config.indexer_types == ("full",) * 78
    assert config.mlp_layer_types == ("dense",) * 3 + ("sparse",) * 75


def test_tiny_preset_is_small_with_every_feature():
    """tiny: < 2M parameters, yet dense + MoE layers, a shared indexer, group routing and MTP."""
    config, model, main, mtp = _param_counts("tiny")
    assert main + mtp < 2_000_000
    _assert_every_feature(config, model)


def test_mini_preset_size_and_features():
    """mini: 30-100M parameters with the same structural features."""
    config, model, main, mtp = _param_counts("mini")
    assert 30e6 <= main + mtp <= 100e6
    _assert_every_feature(config, model)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


def test_preset_dicts_are_copies():
    """Changing a returned preset dict does not change the preset."""
    hf = preset_hf_config("tiny")
    hf["hidden_size"] = 1
    assert ModelConfig.preset("tiny").hidden_size == 64


# ---- the real GLM-5 config.json files ------------------------------------------------------------


def _load_data_config(name: str) -> ModelConfig:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def test_glm5_config_json_equals_preset():
    """GLM-5's own config.json reads to exactly the glm5 preset."""
    config = _load_data_config("glm5-config.json")
    assert config.quantization is None
    assert config == ModelConfig.preset("glm5")


def test_glm5_fp8_config_json():
    """GLM-5-FP8's config.json yields an FP8 quantization config; all else equals the preset."""
    config = _load_data_config("glm5-fp8-config.json")
    q = config.quantization
    assert isinstance(q, FP8Config)
    assert q.weight_block_size == (128, 128) and q.activation_scheme == "dynamic"
    assert "lm_head" in q.modules_to_not_convert
    assert dataclasses.replace(config, quantization=None) == ModelConfig.preset("glm5")


# ---- derived per-layer patterns ------------------------------------------------------------------


def _hf(**changes) -> dict:
    """The tiny preset's HF dict with `changes` applied (a value of None deletes the key)."""
    hf = preset_hf_config("tiny")
    for key, value in changes.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf


@pytest.mark.parametrize(
    "layers, extra",
    [
        (6, {}),  # defaults: freq 1 -> every layer full
        (8, {"index_topk_freq": 2, "index_skip_topk_offset": 2}),
        (9, {"index_topk_freq": 3, "index_skip_topk_offset": 1}),
        (7, {"index_topk_freq": 4}),
        (5, {"index_topk_pattern": "FSSFS"}),
    ],
)
def test_indexer_types_derived_like_transformers(layers, extra):
    """Without indexer_types, the pattern/freq/offset derivation matches transformers' GlmMoeDsaConfig."""
    from transformers import GlmMoeDsaConfig

    hf = _hf(indexer_types=None, num_hidden_layers=layers, **extra)
    ours = ModelConfig.from_hf(hf).indexer_types
    theirs = GlmMoeDsaConfig(num_hidden_layers=layers, **extra).indexer_types
    assert list(ours) == list(theirs)
    assert len(ours) == layers


def test_indexer_types_examples():
    """Concrete derivations: freq 2 / offset 2 gives F F S F S F ..., a pattern string maps F/S."""
    hf = _hf(indexer_types=None, num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=2)
    assert ModelConfig.from_hf(hf).indexer_types == ("full", "full", "shared", "full", "shared", "full")
    hf = _hf(indexer_types=None, num_hidden_layers=4, index_topk_pattern="FSSF")
    assert ModelConfig.from_hf(hf).indexer_types == ("full", "shared", "shared", "full")


def test_explicit_indexer_types_win_over_pattern():
    hf = _hf(indexer_types=["full", "shared", "full", "full"], index_topk_pattern="FFFF")
    config = ModelConfig.from_hf(hf)
    assert config.indexer_types == ("full", "shared", "full", "full")
    assert not config.layer_has_indexer(1) and config.layer_has_indexer(2)
    assert config.layer_has_indexer(4)  # the MTP layer has its own indexer


def test_mlp_layer_types_from_first_k_dense_replace():
    """first_k_dense_replace=k makes the first k layers dense; mlp_layer_types, when given, wins."""
    config = ModelConfig.from_hf(_hf(first_k_dense_replace=2))
    assert config.mlp_layer_types == ("dense", "dense", "sparse", "sparse")
    assert [config.layer_is_moe(i) for i in range(5)] == [False, False, True, True, True]
    config = ModelConfig.from_hf(_hf(first_k_dense_replace=9))
    assert config.mlp_layer_types == ("dense",) * 4
    given = ["sparse", "dense", "sparse", "dense"]
    config = ModelConfig.from_hf(_hf(first_k_dense_replace=3, mlp_layer_types=given))
    assert config.mlp_layer_types == tuple(given)


OPTIONAL_FIELDS = ("first_k_dense_replace", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor",
                   "norm_topk_prob", "rms_norm_eps", "tie_word_embeddings")  # fmt: skip


def test_optional_fields_default_like_transformers():
    """A config.json without the optional fields means what transformers' GlmMoeDsaConfig makes of it."""
    from transformers import GlmMoeDsaConfig

    hf = _hf(num_hidden_layers=5, mlp_layer_types=None, indexer_types=None, **{k: None for k in OPTIONAL_FIELDS})
    ours = ModelConfig.from_hf(hf)
    theirs = GlmMoeDsaConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    assert list(ours.mlp_layer_types) == list(theirs.mlp_layer_types) == ["dense"] * 3 + ["sparse"] * 2
    for field in OPTIONAL_FIELDS[1:]:
        assert getattr(ours, field) == getattr(theirs, field), field


# ---- errors --------------------------------------------------------------------------------------


def _error(hf: dict) -> str:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(hf)
    return str(info.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_other_model_type():
    msg = _error(_hf(model_type="llama"))
    assert "'llama'" in msg and "glm_moe_dsa" in msg


def test_missing_required_field():
    assert "hidden_size is missing" in _error(_hf(hidden_size=None))
    assert "index_topk is missing" in _error(_hf(index_topk=None))


def test_wrong_field_type():
    assert "hidden_size must be int, got '64'" in _error(_hf(hidden_size="64"))
    assert "vocab_size must be int, got True" in _error(_hf(vocab_size=True))


@pytest.mark.parametrize(
    "types, expected",
    [
        (["full", "full", "shared"], "indexer_types must hold 4"),
        (["full", "full", "sparse", "full"], "indexer_types must hold 4"),
        (["shared", "full", "full", "full"], "indexer_types[0] must be 'full'"),
    ],
    ids=["length", "value", "first-shared"],
)
def test_bad_indexer_types(types, expected):
    assert expected in _error(_hf(indexer_types=types))


def test_bad_index_topk_pattern():
    assert "indexer_types must hold 4" in _error(_hf(indexer_types=None, index_topk_pattern="FSX"))


def test_bad_mlp_layer_types():
    assert "mlp_layer_types must hold 4" in _error(_hf(mlp_layer_types=["dense", "moe", "sparse", "sparse"]))


def test_yarn_rope():
    hf = _hf(rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0})
    assert "rope_type 'yarn' is not supported" in _error(hf)


def test_rope_interleave_false():
    assert "rope_interleave=false is not supported" in _error(_hf(rope_interleave=False))
    assert "indexer_rope_interleave=false is not supported" in _error(_hf(indexer_rope_interleave=False))


def test_kv_heads_differ():
    msg = _error(_hf(num_key_value_heads=1))
    assert "num_key_value_heads (1) must equal num_attention_heads" in msg


def test_experts_not_divisible_by_groups():
    msg = _error(_hf(n_routed_experts=9, n_group=2))
    assert "n_routed_experts (9) is not divisible by n_group (2)" in msg


def test_topk_group_exceeds_n_group():
    assert "topk_group (3) exceeds n_group (2)" in _error(_hf(topk_group=3))


def test_non_fp8_quantization():
    msg = _error(_hf(quantization_config={"quant_method": "awq", "bits": 4}))
    assert "quantization_config" in msg and "'awq'" in msg


def test_fp8_block_size():
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [64, 64]}
    assert "weight_block_size [64, 64] is not supported" in _error(_hf(quantization_config=q))


def test_fp8_accepted():
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert ModelConfig.from_hf(_hf(quantization_config=q)).quantization == FP8Config()


def test_eos_outside_vocab():
    msg = _error(_hf(eos_token_id=[0, 1408]))
    assert "eos_token_id [0, 1408] outside the vocabulary (1408)" in msg


def test_every_problem_listed_in_one_error():
    msg = _error(_hf(hidden_size=None, rope_interleave=False, num_key_value_heads=2))
    assert "hidden_size is missing" in msg
    assert "rope_interleave=false" in msg
    assert "num_key_value_heads (2)" in msg


def test_config_json_not_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "glm_moe_dsa",')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        ModelConfig.from_model_dir(tmp_path)


def test_config_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        ModelConfig.from_model_dir(tmp_path)


def test_config_json_missing(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        ModelConfig.from_model_dir(tmp_path)


def test_from_model_dir_reads_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_hf_config("mini")))
    assert ModelConfig.from_model_dir(tmp_path) == ModelConfig.preset("mini")
