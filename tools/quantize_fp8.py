"""Convert a BF16 GLM-5 Hugging Face checkpoint dir into the GLM-5-FP8 format.

    python tools/quantize_fp8.py SRC DST

GLM-5-FP8 format (block-scaled, DeepSeek-V3 style): every linear-layer weight ``X.weight``
``[out, in]`` is replaced, in the same shard, by ``X.weight`` in float8_e4m3fn and
``X.weight_scale_inv`` in fp32 ``[ceil(out/128), ceil(in/128)]``, with
``w = w_fp8 * scale_inv[i // 128, j // 128]`` (see ops/fp8.py). The linears are the ``*_proj``
layers (q_a/q_b/kv_a_proj_with_mqa/kv_b/o, gate/up/down of dense MLPs, experts and shared
experts, the MTP ``eh_proj``) and the indexer's ``wq_b`` and ``wk``. Everything else keeps its
dtype and bytes: embeddings, lm_head, the MTP ``shared_head.head``, norms, the router gate and
its ``e_score_correction_bias``, and the indexer ``weights_proj``. config.json gains a
``quantization_config`` (activations are quantized per token at run time: "dynamic").

The output keeps the source layout: the same shard file names, each tensor in the same shard,
a rewritten model.safetensors.index.json, and every other file copied unchanged. Tensors are
read one by one with safetensors' safe_open and written shard by shard, so memory peaks at about
one output shard.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm5c.ops import fp8

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"

_KEEP_MODULES = ("weights_proj",)  # the indexer head weights: a "_proj" that stays in high precision
_INDEXER_LINEARS = ("wq_b", "wk")


def is_quantized_weight(name: str) -> bool:
    """True for the tensor names GLM-5-FP8 stores in FP8: `*_proj.weight` (and
    `kv_a_proj_with_mqa.weight`, which does not end in `_proj`) and the indexer's wq_b / wk."""
    if not name.endswith(".weight"):
        return False
    parent, _, module = name[: -len(".weight")].rpartition(".")
    if module in _KEEP_MODULES:
        return False
    if module in _INDEXER_LINEARS:
        return parent.endswith(".indexer")
    return module.endswith("_proj") or module == "kv_a_proj_with_mqa"


def quantization_config(num_layers: int) -> dict:
    """The config.json entry of GLM-5-FP8 (`indexers_proj` is misspelt as in the official one)."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [fp8.WEIGHT_BLOCK, fp8.WEIGHT_BLOCK],
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"]
        + [f"model.layers.{i}.self_attn.indexers_proj" for i in range(num_layers)],
    }


def _find_shards(src: Path) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names (in index order) and the source weight_map (None without an index)."""
    index_path = src / INDEX_NAME
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
        if not shards:
            raise ValueError(f"{index_path} has an empty weight_map")
        for shard in shards:
            if not (src / shard).is_file():
                raise FileNotFoundError(f"shard {shard} named in {index_path} is missing")
        return shards, weight_map
    if (src / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    found = sorted(p.name for p in src.glob("*.safetensors"))
    if found:
        raise FileNotFoundError(f"{src} has {found} but neither {INDEX_NAME} nor {SINGLE_NAME}")
    raise FileNotFoundError(f"no safetensors files in {src}")


def _check_source(src: Path, shards: list[str], weight_map: dict[str, str] | None) -> None:
    """Read only the shard headers: reject FP8 input and index/shard mismatches before writing."""
    for shard in shards:
        with safe_open(src / shard, framework="pt") as f:
            names = set(f.keys())
            scales = sorted(n for n in names if n.endswith(SCALE_SUFFIX))
            if scales:
                raise ValueError(f"{src / shard}: tensor {scales[0]} shows it is already FP8")
            for name in sorted(names):
                if is_quantized_weight(name):
                    sl = f.get_slice(name)
                    if sl.get_dtype().startswith("F8"):
                        raise ValueError(f"{src / shard}: tensor {name} is already {sl.get_dtype()}")
                    if len(sl.get_shape()) != 2:
                        shape = sl.get_shape()
                        raise ValueError(f"{src / shard}: linear weight {name} has shape {shape}, not 2-D")
        if weight_map is not None:
            listed = {n for n, s in weight_map.items() if s == shard}
            if listed != names:
                diff = sorted(listed ^ names)[:5]
                raise ValueError(
                    f"{src / shard} does not hold the tensors {INDEX_NAME} assigns to it, e.g. {diff}"
                )


def quantize_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Write the GLM-5-FP8 form of the BF16 checkpoint dir `src` into the new dir `dst`."""
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {src}")
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        raise ValueError(f"{config_path} has a quantization_config: the checkpoint is already quantized")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"destination {dst} exists and is not an empty directory")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"destination {dst} must not be {src} or inside it")
    shards, weight_map = _find_shards(src)
    _check_source(src, shards, weight_map)

    dst.mkdir(parents=True, exist_ok=True)
    new_map: dict[str, str] = {}
    total_size = total_params = 0
    for shard in shards:
        log.info("quantizing %s", shard)
        out: dict[str, torch.Tensor] = {}
        with safe_open(src / shard, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                t = f.get_tensor(name)
                if is_quantized_weight(name):
                    out[name], out[name + SCALE_SUFFIX] = fp8.quantize_weight_blocks(t)
                else:
                    out[name] = t
        save_file(out, dst / shard, metadata=metadata)
        for name, t in out.items():
            new_map[name] = shard
            total_size += t.numel() * t.element_size()
            total_params += t.numel()
        del out

    if weight_map is not None:
        index = json.loads((src / INDEX_NAME).read_text())
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = total_size
        if "total_parameters" in meta:
            meta["total_parameters"] = total_params
        index["metadata"] = meta
        index["weight_map"] = dict(sorted(new_map.items()))
        (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    num_layers = config["num_hidden_layers"] + config.get("num_nextn_predict_layers", 0)
    config["quantization_config"] = quantization_config(num_layers)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    handled = set(shards) | {INDEX_NAME, "config.json"}
    for p in sorted(src.iterdir()):
        if p.name in handled:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a BF16 GLM-5 checkpoint dir to GLM-5-FP8.")
    parser.add_argument("src", type=Path, help="source checkpoint dir (BF16)")
    parser.add_argument("dst", type=Path, help="new output dir (must not exist or be empty)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        quantize_checkpoint(args.src, args.dst)
    except (ValueError, OSError) as e:
        sys.exit(f"quantize_fp8: error: {e}")


if __name__ == "__main__":
    main()
