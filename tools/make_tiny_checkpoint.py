"""Make a small random GLM-5 checkpoint in true Hugging Face layout, with a tokenizer.

The checkpoint is written by transformers' own `GlmMoeDsaForCausalLM.save_pretrained` (per-expert
tensor names, sharded with `model.safetensors.index.json`), plus the MTP layer that transformers
does not implement, stored as GLM-5 stores it: layer index `num_hidden_layers`, with `enorm`,
`hnorm`, `eh_proj` and `shared_head.norm` beside a full decoder layer.

Random weights are nudged so the checks built on them are meaningful:
  * every norm weight, the indexer LayerNorm and the router's correction bias are random, not
    their identity/zero initial values, so a misplaced norm or an ignored bias shows up;
  * the DSA indexer has no ties: hidden feature 0 is a positive channel that the embedding sets
    and no layer writes to, and the indexer's head weights, its query's non-RoPE part and its
    key bias are aligned with it, so every score is a sum of strictly positive,
    position-dependent terms. (With random weights ReLU makes exact-zero ties, and top-k picks
    among ties differ between implementations.)
Everything is seeded: the same arguments write the same bytes.

Usage: python tools/make_tiny_checkpoint.py OUT_DIR [--preset tiny|mini] [--seed N] [--fp8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from glm5c.config import ModelConfig, preset_hf_config
from glm5c.tools.make_tokenizer import build_tokenizer

INIT_STD = {"tiny": 0.08, "mini": 0.04}


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    fp8: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """Write a checkpoint directory (config, safetensors shards + index, tokenizer) and return it.
    `overrides` changes Hugging Face config fields of the preset (e.g. another layer pattern).
    With fp8=True the result is also converted to the GLM-5-FP8 format (tools/quantize_fp8.py)."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    hf = preset_hf_config(preset)
    hf.update(overrides or {})
    hf.setdefault("initializer_range", INIT_STD.get(preset, 0.04))
    with tempfile.TemporaryDirectory() as tmp:
        eos_ids = build_tokenizer(tmp)
        tokenizer_size = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json")).get_vocab_size()
        if tokenizer_size > hf["vocab_size"]:
            raise ValueError(f"vocab_size {hf['vocab_size']} is smaller than the tokenizer's {tokenizer_size} entries")
        hf["eos_token_id"], hf["pad_token_id"], hf["bos_token_id"] = eos_ids, eos_ids[0], None
        config = ModelConfig.from_hf(hf)  # validate before spending time
        n_main, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers

        # Build one more layer per MTP layer; transformers saves it under the MTP layer's index.
        with_mtp = dict(hf)
        with_mtp["num_hidden_layers"] = n_main + n_mtp
        with_mtp["mlp_layer_types"] = list(config.mlp_layer_types) + ["sparse"] * n_mtp
        with_mtp["indexer_types"] = list(config.indexer_types) + ["full"] * n_mtp
        with_mtp.pop("first_k_dense_replace", None)
        torch.manual_seed(seed)
        hf_config = GlmMoeDsaConfig(**{k: v for k, v in with_mtp.items() if k not in ("architectures", "model_type")})
        model = GlmMoeDsaForCausalLM(hf_config).eval()
        extra = _shape_weights(model, config, seed)
        dtype = getattr(torch, config.dtype)
        model.to(dtype)

        stage = Path(tmp) / "ckpt"
        shard = max_shard_size or ("200KB" if preset == "tiny" else "40MB")
        model.save_pretrained(stage, max_shard_size=shard)
        _add_mtp_extras(stage, {k: v.to(dtype) for k, v in extra.items()}, n_main)
        hf_out = json.loads((stage / "config.json").read_text())
        hf_out.update(hf)  # the main model's layer counts and patterns, GLM-5 field names
        hf_out["num_hidden_layers"] = n_main
        hf_out["mlp_layer_types"] = list(config.mlp_layer_types)
        hf_out["indexer_types"] = list(config.indexer_types)
        hf_out.pop("layer_types", None)  # transformers derives it from num_hidden_layers
        (stage / "config.json").write_text(json.dumps(hf_out, indent=2, sort_keys=True) + "\n")
        for f in Path(tmp).iterdir():
            if f.is_file():
                shutil.copy(f, stage / f.name)  # the tokenizer files
        if fp8:
            from glm5c.tools.quantize_fp8 import quantize_checkpoint

            quantize_checkpoint(stage, out_dir)
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            if out_dir.exists():
                out_dir.rmdir()
            shutil.copytree(stage, out_dir)
    return out_dir


@torch.no_grad()
def _shape_weights(model: torch.nn.Module, config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Randomise norms and biases, align the indexers (see the module docstring), and make the
    MTP-only tensors. Returns those extra tensors by checkpoint name."""
    gen = torch.Generator().manual_seed(seed + 1)

    def noise(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    d, r = config.hidden_size, config.qk_rope_head_dim
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + noise(*p.shape, std=0.2))
        elif name.endswith("e_score_correction_bias"):
            p.copy_(noise(*p.shape, std=0.3))
    # Hidden feature 0 is a positive channel no layer writes to: the embedding puts a positive
    # value there, output projections leave it alone, and the norms in front of the indexers keep
    # its sign, so every indexer sees it.
    emb = model.model.embed_tokens.weight
    emb[:, 0] = emb[:, 0].abs() + 0.25
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")) and p.dim() == 2:
            p[0, :] = 0.0
        elif name.endswith("experts.down_proj"):  # transformers' stacked experts [E, D, I]
            p[:, 0, :] = 0.0
        elif name.endswith(("input_layernorm.weight", "q_a_layernorm.weight")):
            p[0] = p[0].abs()
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.indexer is None:
            continue
        idx = attn.indexer
        heads, head_dim = idx.n_heads, idx.head_dim
        # head weights > 0: weights_proj(x) is dominated by feature 0
        idx.weights_proj.weight[:, 1:] *= 0.1
        idx.weights_proj.weight[:, 0] = 1.0 + noise(heads, std=0.1).abs()
        # q latent feature 0 reads only hidden feature 0 ...
        attn.q_a_proj.weight[0, :] = 0.0
        attn.q_a_proj.weight[0, 0] = 1.0
        # ... and every head's non-RoPE query part mostly follows q latent feature 0
        wq = idx.wq_b.weight.view(heads, head_dim, -1)
        wq[:, r:, 1:] *= 0.2
        wq[:, r:, 0] = 0.5 + noise(heads, head_dim - r, std=0.1).abs()
        # keys carry a positive bias on the non-RoPE part, so q . k > 0 with a position-dependent rest
        idx.k_norm.bias[r:] = 1.0 + noise(head_dim - r, std=0.1).abs()
        idx.k_norm.bias[:r] = noise(r, std=0.1)
        idx.k_norm.weight.copy_(1.0 + noise(head_dim, std=0.1).abs())
    # the MTP layers' input keeps the positive channel: eh_proj row 0 reads only feature 0 of
    # the normed embedding and of the normed hidden state
    extra: dict[str, torch.Tensor] = {}
    for layer in range(config.num_hidden_layers, config.num_layers_with_mtp):
        eh = noise(d, 2 * d, std=float(model.config.initializer_range))
        eh[0, :] = 0.0
        eh[0, 0] = eh[0, d] = 1.0
        enorm, hnorm = 1.0 + noise(d, std=0.2), 1.0 + noise(d, std=0.2)
        enorm[0], hnorm[0] = enorm[0].abs(), hnorm[0].abs()
        prefix = f"model.layers.{layer}."
        extra[prefix + "enorm.weight"] = enorm
        extra[prefix + "hnorm.weight"] = hnorm
        extra[prefix + "eh_proj.weight"] = eh
        extra[prefix + "shared_head.norm.weight"] = 1.0 + noise(d, std=0.2)
    return extra


def _add_mtp_extras(ckpt: Path, extra: dict[str, torch.Tensor], n_main: int) -> None:
    """Append the MTP-only tensors to the shard that holds the first MTP layer, and index them."""
    if not extra:
        return
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][f"model.layers.{n_main}.input_layernorm.weight"]
    tensors = load_file(ckpt / shard)
    tensors.update({k: v.contiguous() for k, v in extra.items()})
    save_file(tensors, ckpt / shard, metadata={"format": "pt"})
    for k, v in extra.items():
        index["weight_map"][k] = shard
        index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + v.nbytes
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "mini"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp8", action="store_true", help="write the GLM-5-FP8 format")
    args = parser.parse_args(argv)
    print(make_checkpoint(args.out_dir, args.preset, args.seed, fp8=args.fp8))


if __name__ == "__main__":
    main()
