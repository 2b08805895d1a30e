"""GLM-5 model configuration: read a Hugging Face `config.json` (model type `glm_moe_dsa`),
validate it once, and expose it as a typed, frozen dataclass.

Presets:
  glm5  the real GLM-5 dimensions (744B parameters; for planning and shape tests)
  tiny  tests: < 2M parameters, every structural feature (dense + MoE layers, group-limited
        routing, a `shared` indexer layer, an MTP layer)
  mini  CPU benchmarks: ~60M parameters, same structure
Presets are plain Hugging Face config dicts, so the checkpoint tools feed them straight to
transformers' `GlmMoeDsaConfig`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_TYPE = "glm_moe_dsa"


class ConfigError(ValueError):
    """A config.json that glm5c cannot serve, with the reason."""


@dataclass(frozen=True)
class FP8Config:
    """GLM-5-FP8's `quantization_config`: e4m3 weights in 128x128 blocks, dynamic activations."""

    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()

    def unconverted_modules(self) -> tuple[str, ...]:
        """modules_to_not_convert in checkpoint names: GLM-5-FP8 lists the indexer's head-weight
        projection under a misspelt name, `self_attn.indexers_proj` for `self_attn.indexer.weights_proj`."""
        return tuple(m.replace(".indexers_proj", ".indexer.weights_proj") for m in self.modules_to_not_convert)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP
    moe_intermediate_size: int  # per routed / shared expert
    num_hidden_layers: int  # main layers; the MTP layers are stored after them
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    mlp_layer_types: tuple[str, ...]  # "dense" | "sparse", one per main layer
    indexer_types: tuple[str, ...]  # "full" | "shared", one per main layer
    num_nextn_predict_layers: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    dtype: str  # the checkpoint's dtype: "bfloat16" | "float16" | "float32"
    quantization: FP8Config | None = None
    # transformers builds q_a_layernorm / kv_a_layernorm / the indexer k_norm with eps 1e-6
    # (vLLM uses rms_norm_eps for the first two); we match the oracle.
    latent_norm_eps: float = 1e-6

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached MLA entry: the latent plus the shared RoPE key (576 for GLM-5)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def layer_is_moe(self, layer: int) -> bool:
        """Layer index in the checkpoint's numbering; the MTP layers are always MoE."""
        return layer >= self.num_hidden_layers or self.mlp_layer_types[layer] == "sparse"

    def layer_has_indexer(self, layer: int) -> bool:
        """`shared` layers reuse the previous layer's top-k; the MTP layers have their own."""
        return layer >= self.num_hidden_layers or self.indexer_types[layer] == "full"

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Validate a Hugging Face config dict once; every problem found is listed in one error."""
        problems: list[str] = []
        if hf.get("model_type") != MODEL_TYPE:
            raise ConfigError(
                f"config.json has model_type {hf.get('model_type')!r}; glm5c serves {MODEL_TYPE!r} (GLM-5) only"
            )

        def get(key: str, kind: type, default: Any = None) -> Any:
            value = hf.get(key, default)
            if value is None:
                problems.append(f"{key} is missing")
                return kind()
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
                problems.append(f"{key} must be {kind.__name__}, got {value!r}")
                return kind()
            return value

        n_layers = get("num_hidden_layers", int)
        fields: dict[str, Any] = {
            name: get(name, int, default)
            for name, default in [
                ("vocab_size", None),
                ("hidden_size", None),
                ("intermediate_size", None),
                ("moe_intermediate_size", None),
                ("num_attention_heads", None),
                ("q_lora_rank", None),
                ("kv_lora_rank", None),
                ("qk_nope_head_dim", None),
                ("qk_rope_head_dim", None),
                ("v_head_dim", None),
                ("n_routed_experts", None),
                ("n_shared_experts", 1),
                ("num_experts_per_tok", None),
                ("n_group", 1),
                ("topk_group", 1),
                ("index_n_heads", None),
                ("index_head_dim", None),
                ("index_topk", None),
                ("num_nextn_predict_layers", 0),
                ("max_position_embeddings", None),
            ]
        }
        fields["num_hidden_layers"] = n_layers
        # Defaults of optional fields are transformers' GlmMoeDsaConfig defaults (GLM-5's values).
        fields["routed_scaling_factor"] = get("routed_scaling_factor", float, 2.5)
        fields["norm_topk_prob"] = get("norm_topk_prob", bool, True)
        fields["rms_norm_eps"] = get("rms_norm_eps", float, 1e-5)
        fields["tie_word_embeddings"] = get("tie_word_embeddings", bool, False)

        kv_heads = hf.get("num_key_value_heads", fields["num_attention_heads"])
        if kv_heads != fields["num_attention_heads"]:
            problems.append(f"num_key_value_heads ({kv_heads}) must equal num_attention_heads under MLA")

        # RoPE: GLM-5 uses plain interleaved RoPE with no scaling.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            problems.append(f"rope_parameters must be an object, got {rope!r}")
            rope = {}
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if not isinstance(theta, (int, float)) or theta <= 0:
            problems.append(f"rope_theta must be a positive number, got {theta!r}")
            theta = 1.0
        fields["rope_theta"] = float(theta)
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type {rope.get('rope_type')!r} is not supported (GLM-5 uses 'default')")
        for key in ("rope_interleave", "indexer_rope_interleave"):
            if hf.get(key, True) is not True:
                problems.append(f"{key}=false is not supported (GLM-5 interleaves RoPE pairs)")

        for key, allowed in [
            ("hidden_act", "silu"),
            ("scoring_func", "sigmoid"),
            ("topk_method", "noaux_tc"),
            ("attention_bias", False),
            ("mlp_bias", False),
            ("moe_layer_freq", 1),
        ]:
            if key in hf and hf[key] != allowed:
                problems.append(f"{key}={hf[key]!r} is not supported (GLM-5 has {allowed!r})")

        # Per-layer MLP kind: newer configs spell it mlp_layer_types, older first_k_dense_replace.
        mlp_types = hf.get("mlp_layer_types")
        if mlp_types is None:
            n_dense = min(get("first_k_dense_replace", int, 3), n_layers)
            mlp_types = ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense)
        fields["mlp_layer_types"] = tuple(mlp_types)
        if len(mlp_types) != n_layers or not set(mlp_types) <= {"dense", "sparse"}:
            problems.append(f"mlp_layer_types must hold {n_layers} of 'dense'/'sparse', got {mlp_types!r}")

        # Per-layer indexer kind, derived as transformers does when absent.
        idx_types = hf.get("indexer_types")
        if idx_types is None:
            pattern = hf.get("index_topk_pattern")
            if pattern is not None:
                idx_types = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
            else:
                freq, offset = hf.get("index_topk_freq", 1), hf.get("index_skip_topk_offset", 2)
                if not (isinstance(freq, int) and isinstance(offset, int)):
                    problems.append(f"index_topk_freq / index_skip_topk_offset must be integers, got {freq!r}, {offset!r}")
                    freq, offset = 1, 0
                freq = max(freq, 1)
                idx_types = ["full" if (max(i - offset + 1, 0) % freq) == 0 else "shared" for i in range(n_layers)]
        fields["indexer_types"] = tuple(idx_types)
        if len(idx_types) != n_layers or not set(idx_types) <= {"full", "shared"}:
            problems.append(f"indexer_types must hold {n_layers} of 'full'/'shared', got {idx_types!r}")
        elif idx_types and idx_types[0] != "full":
            problems.append("indexer_types[0] must be 'full': a shared layer reuses an earlier layer's top-k")

        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            problems.append(f"eos_token_id must be an int or a list of ints, got {eos!r}")
            eos_ids = []
        fields["eos_token_ids"] = tuple(eos_ids)
        pad = hf.get("pad_token_id")
        fields["pad_token_id"] = pad if isinstance(pad, int) else None
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
        if dtype not in ("bfloat16", "float16", "float32"):
            problems.append(f"dtype {dtype!r} is not supported (bfloat16, float16 or float32)")
        fields["dtype"] = dtype
        fields["quantization"] = _read_quantization(hf.get("quantization_config"), problems)

        if problems:
            raise ConfigError("invalid GLM-5 config: " + "; ".join(problems))
        config = cls(**fields)
        config._check_sizes()
        return config

    def _check_sizes(self) -> None:
        problems: list[str] = []
        for name in (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads q_lora_rank kv_lora_rank qk_nope_head_dim v_head_dim n_routed_experts "
            "num_experts_per_tok n_group topk_group index_n_heads index_head_dim index_topk "
            "max_position_embeddings"
        ).split():
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim must be positive and even, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            problems.append("index_head_dim must be at least qk_rope_head_dim (the indexer ropes its first dims)")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok exceeds n_routed_experts")
        if self.n_group > 0 and self.n_routed_experts % self.n_group:
            problems.append(f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group ({self.n_group})")
        elif self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            problems.append("group-limited routing needs at least 2 experts per group")
        if self.topk_group > self.n_group:
            problems.append(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        elif self.n_group > 0 and self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            problems.append("topk_group groups hold fewer experts than num_experts_per_tok")
        if self.n_shared_experts < 0 or self.num_nextn_predict_layers < 0:
            problems.append("n_shared_experts and num_nextn_predict_layers must not be negative")
        if any(e < 0 or e >= self.vocab_size for e in self.eos_token_ids):
            problems.append(f"eos_token_id {list(self.eos_token_ids)} outside the vocabulary ({self.vocab_size})")
        if problems:
            raise ConfigError("invalid GLM-5 config: " + "; ".join(problems))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir} has no config.json: is it a Hugging Face model directory?")
        try:
            hf = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf(hf)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        return cls.from_hf(preset_hf_config(name))


def _read_quantization(q: Any, problems: list[str]) -> FP8Config | None:
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        problems.append(f"quantization_config {q!r} is not supported (only GLM-5-FP8's quant_method 'fp8')")
        return None
    block = tuple(q.get("weight_block_size") or ())
    if block != (128, 128):
        problems.append(f"weight_block_size {list(block)} is not supported (GLM-5-FP8 uses [128, 128])")
    if q.get("fmt", "e4m3") != "e4m3":
        problems.append(f"fp8 fmt {q.get('fmt')!r} is not supported (e4m3)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        problems.append(f"activation_scheme {q.get('activation_scheme')!r} is not supported (dynamic)")
    return FP8Config(
        weight_block_size=(128, 128),
        activation_scheme="dynamic",
        modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()),
    )


# ---- presets (Hugging Face config dicts) ------------------------------------------------------

_GLM5: dict[str, Any] = {
    "architectures": ["GlmMoeDsaForCausalLM"],
    "model_type": MODEL_TYPE,
    "attention_bias": False,
    "dtype": "bfloat16",
    "eos_token_id": [154820, 154827, 154829],
    "pad_token_id": 154820,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "index_head_dim": 128,
    "index_n_heads": 32,
    "index_topk": 2048,
    "intermediate_size": 12288,
    "kv_lora_rank": 512,
    "max_position_embeddings": 202752,
    "moe_intermediate_size": 2048,
    "n_group": 1,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 78,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 2048,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
    "routed_scaling_factor": 2.5,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "v_head_dim": 256,
    "vocab_size": 154880,
}

# Small presets keep GLM-5's structure. Their eos/pad ids are those of the built-in tokenizer
# (tools/make_tokenizer.py), which the checkpoint tools write over when they make a checkpoint.
_TINY: dict[str, Any] = {
    **_GLM5,
    "dtype": "float32",
    "vocab_size": 1408,  # the built-in tokenizer's 1395 entries, rounded up to a multiple of 64
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "indexer_types": ["full", "full", "shared", "full"],
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "index_n_heads": 8,
    "index_head_dim": 16,
    "index_topk": 16,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "eos_token_id": [0],
    "pad_token_id": 0,
}

_MINI: dict[str, Any] = {
    **_GLM5,
    "vocab_size": 1408,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 6,
    "first_k_dense_replace": 1,
    "indexer_types": ["full", "full", "shared", "full", "shared", "full"],
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,  # group-limited routing, as in tiny
    "topk_group": 2,
    "index_n_heads": 8,
    "index_head_dim": 64,
    "index_topk": 256,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "eos_token_id": [0],
    "pad_token_id": 0,
}

PRESETS: dict[str, dict[str, Any]] = {"glm5": _GLM5, "tiny": _TINY, "mini": _MINI}


def preset_hf_config(name: str) -> dict[str, Any]:
    """A fresh copy of a preset's Hugging Face config dict."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
