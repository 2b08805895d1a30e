"""Loading GLM-5 checkpoints (BF16 and GLM-5-FP8), safetensors only.

The model is built on the meta device, every tensor's name, shape and dtype is checked against
the checkpoint's headers before any memory is allocated (one error lists every problem), then
parameters are allocated once and filled shard by shard as tensors stream in: never two full
copies in memory.

Checkpoint names map to module names one to one, except:
  model.layers.{i}.X                       -> layers.{i}.X       (i < num_hidden_layers)
  model.layers.{num_hidden_layers}.X       -> mtp.X              (the MTP layer)
  ...mlp.experts.{e}.gate_proj.weight      -> ...mlp.experts.gate_proj[e - first_expert]  (stacked;
                                              other ranks' experts are checked but not read)
  X.weight_scale_inv next to an FP8 X.weight is kept when the module is FP8, else the weight is
  dequantized on load (kv_b_proj, which attention absorbs, is always dequantized).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import ModelConfig
from .model import GLM5, Experts, Linear, MLAttention, Sharding
from .ops import REFERENCE, Ops
from .ops.fp8 import dequantize_weight_blocks

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint glm5c cannot load, with every reason found."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16", "F8_E4M3"
    offset: int  # byte offset of the data in the file
    nbytes: int


def read_checkpoint_index(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Name -> (file, shape, dtype) for every tensor, read from the safetensors headers only."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        weight_map = None
    if not files:
        others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = f" (found {', '.join(others)}: glm5c loads safetensors only, never pickles)" if others else ""
        raise CheckpointError(f"{model_dir} holds no *.safetensors weights{hint}")

    tensors: dict[str, TensorInfo] = {}
    for name in files:
        try:
            with safe_open(model_dir / name, framework="pt"):
                pass  # safetensors validates the whole header against the file
            tensors.update(_read_header(model_dir / name))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{model_dir / name} is not a readable safetensors file: {e}") from None
    if weight_map is not None:
        wrong = [k for k, f in weight_map.items() if tensors.get(k) is None or tensors[k].file != f]
        if wrong:
            raise CheckpointError(
                f"{INDEX_FILE} names tensors its shards do not hold: {_listing(wrong)}"
            )
    return tensors


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file: an 8-byte little-endian header size, a JSON header of
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets after the header), then the data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    start = 8 + size
    return {
        key: TensorInfo(path.name, tuple(v["shape"]), v["dtype"], start + v["data_offsets"][0],
                        v["data_offsets"][1] - v["data_offsets"][0])  # fmt: skip
        for key, v in header.items()
        if key != "__metadata__"
    }


def checkpoint_name(param: str, config: ModelConfig) -> str:
    """Module parameter name -> checkpoint tensor name (experts: the stacked name, without index)."""
    if param.startswith("layers."):
        return "model." + param
    if param.startswith("mtp."):
        return f"model.layers.{config.num_hidden_layers}." + param[len("mtp.") :]
    if param.startswith(("embed_tokens.", "norm.")):
        return "model." + param
    return param


def build_model(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    ops: Ops = REFERENCE,
    sharding: Sharding = Sharding(),
    keep_fp8: bool = True,
) -> GLM5:
    """Load a GLM-5 checkpoint directory into a ready-to-run model (eval mode, no grads).
    An FP8 checkpoint keeps its FP8 weights unless keep_fp8=False, which dequantizes them on
    load (for devices without FP8 matrix units; a CPU runs the dequantized model much faster)."""
    if not Path(model_dir).is_dir():  # say so, rather than "has no config.json"
        raise CheckpointError(f"model directory {model_dir} does not exist")
    config = ModelConfig.from_model_dir(model_dir)
    tensors = read_checkpoint_index(model_dir)
    dtype = dtype or getattr(torch, config.dtype)
    mtp_layer = f"model.layers.{config.num_hidden_layers}."
    has_mtp = any(k.startswith(mtp_layer) for k in tensors)
    fp8 = keep_fp8 and any(k.endswith(SCALE_SUFFIX) for k in tensors)
    with torch.device("meta"):
        model = GLM5(
            config, ops=ops, dtype=dtype, fp8=fp8, sharding=sharding, mtp=has_mtp,
            mtp_own_embed=mtp_layer + "embed_tokens.weight" in tensors,
            mtp_own_head=mtp_layer + "shared_head.head.weight" in tensors,
        )  # fmt: skip
    if fp8:
        _unquantize_linears_stored_plain(model, config, tensors)
    plan = _plan(model, config, tensors)
    _materialize(model, torch.device(device))
    _fill(model, Path(model_dir), plan, tensors)
    _pack(model, ops)
    return model.eval().requires_grad_(False)


def _pack(model: GLM5, ops: Ops) -> None:
    """Unquantized weights in the layouts the model's ops run fastest (Ops.pack_experts, pack_linear),
    but for those the model reads itself (Linear.viewed: kv_b_proj, whose per-head views MLA absorbs:
    those are packed as copies, MLAttention.pack_absorbed)."""
    for module in model.modules():
        if isinstance(module, Experts) and module.gate_proj_scale_inv is None and ops.pack_experts is not None:
            packed = ops.pack_experts(module.gate_proj, module.up_proj, module.down_proj)
            module.gate_proj, module.up_proj, module.down_proj = (nn.Parameter(w, requires_grad=False) for w in packed)
        elif isinstance(module, Linear) and module.weight_scale_inv is None and not module.viewed \
                and ops.pack_linear is not None:  # fmt: skip
            module.weight = nn.Parameter(ops.pack_linear(module.weight), requires_grad=False)
        elif isinstance(module, MLAttention) and ops.pack_linear is not None:
            module.pack_absorbed(ops.pack_linear)


def _materialize(model: GLM5, device: torch.device) -> None:
    """Give every meta parameter uninitialised memory (Module.to_empty does the same, but goes
    through torch's reference ops and their imports, a second or more on a cold start)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False
                )
    for name in ("inv_freq", "rope_cos", "rope_sin"):
        setattr(model, name, torch.empty(getattr(model, name).shape, dtype=getattr(model, name).dtype, device=device))
    model.reset_buffers()


@dataclass(frozen=True)
class _Target:
    param: str  # module parameter name
    expert: int | None = None  # local expert index into a stacked parameter
    scale_of: str | None = None  # set on a weight that must be dequantized with this scale tensor


def _unquantize_linears_stored_plain(model: GLM5, config: ModelConfig, tensors: dict[str, TensorInfo]) -> None:
    """An FP8 checkpoint may leave some linears in BF16: make those modules plain before allocation."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.weight_scale_inv is not None:
            key = checkpoint_name(name + ".weight", config)
            if key + SCALE_SUFFIX not in tensors:
                module.weight = nn.Parameter(torch.empty(module.weight.shape, dtype=model.dtype), requires_grad=False)
                module.weight_scale_inv = None


def _plan(model: GLM5, config: ModelConfig, tensors: dict[str, TensorInfo]) -> dict[str, _Target]:
    """Checkpoint name -> where it goes. Raises one CheckpointError listing every mismatch."""
    params = dict(model.named_parameters())
    plan: dict[str, _Target] = {}
    expected: set[str] = set()
    problems: list[str] = []
    n_experts = config.n_routed_experts

    for name, p in params.items():
        key = checkpoint_name(name, config)
        expert_stack = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$", key)
        if expert_stack:
            prefix, proj, scale = expert_stack.groups()
            first = model.get_submodule(name.rsplit(".", 1)[0]).first_expert
            for e in range(n_experts):
                ckpt = f"{prefix}.{e}.{proj}.weight" + (SCALE_SUFFIX if scale else "")
                expected.add(ckpt)
                if first <= e < first + p.shape[0]:
                    plan[ckpt] = _Target(name, expert=e - first)
            continue
        expected.add(key)
        plan[key] = _Target(name)

    # FP8 weights stored for modules held dequantized (kv_b_proj, or a plain model of an FP8 checkpoint)
    for key in list(plan):
        scale_key = key + SCALE_SUFFIX
        target = plan[key]
        if scale_key in tensors and key.endswith(".weight") and not target.param.endswith("scale_inv"):
            if params[target.param].dtype != torch.float8_e4m3fn:
                expected.add(scale_key)
                plan[key] = _Target(target.param, target.expert, scale_of=scale_key)

    problems += _check_quantization(config, tensors)
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    wrong: list[str] = []
    for key, target in plan.items():
        info = tensors.get(key)
        if info is None:
            continue
        p = params[target.param]
        want = tuple(p.shape[1:] if target.expert is not None else p.shape)
        if info.shape != want:
            wrong.append(f"{key} has shape {list(info.shape)}, expected {list(want)}")
        elif info.dtype not in _DTYPES:
            wrong.append(f"{key} has unsupported dtype {info.dtype}")
        elif (info.dtype == "F8_E4M3") != (p.dtype == torch.float8_e4m3fn or target.scale_of is not None):
            wrong.append(f"{key} is {info.dtype} but is loaded as {p.dtype} without a block scale")
    if wrong:
        problems.append("wrong shapes or dtypes: " + "; ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else ""))
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + " | ".join(problems))
    return {k: t for k, t in plan.items() if k in tensors}


def _check_quantization(config: ModelConfig, tensors: dict[str, TensorInfo]) -> list[str]:
    """FP8 tensors must come with a quantization_config, and never in a module it leaves unconverted."""
    fp8_weights = sorted(k for k, t in tensors.items() if t.dtype == "F8_E4M3")
    if not fp8_weights:
        return []
    if config.quantization is None:
        return [f"FP8 tensors ({_listing(fp8_weights, 3)}) but config.json has no quantization_config"]
    unconverted = config.quantization.unconverted_modules()
    wrong = [k for k in fp8_weights if any(k.startswith(m + ".") for m in unconverted)]
    return [f"stored in FP8 but listed in modules_to_not_convert: {_listing(wrong)}"] if wrong else []


@torch.no_grad()
def _fill(model: GLM5, model_dir: Path, plan: dict[str, _Target], tensors: dict[str, TensorInfo]) -> None:
    """Read each tensor straight from its file into its parameter (one copy, as `cat` does; no
    mapping of whole shards). A tensor stored in another dtype, or dequantized on load, goes
    through a buffer of its own size."""
    params = dict(model.named_parameters())
    by_file: dict[str, list[str]] = {}
    for key in plan:
        by_file.setdefault(tensors[key].file, []).append(key)
    for file, keys in sorted(by_file.items()):
        fd = os.open(model_dir / file, os.O_RDONLY)
        try:
            for key in sorted(keys, key=lambda k: tensors[k].offset):  # sequential reads
                target, info = plan[key], tensors[key]
                dst = params[target.param]
                if target.expert is not None:
                    dst = dst[target.expert]
                src_dtype = _DTYPES[info.dtype]
                if target.scale_of is None and src_dtype == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
                    _pread_into(fd, info, dst)
                    continue
                src = torch.empty(info.shape, dtype=src_dtype)
                _pread_into(fd, info, src)
                if target.scale_of is not None:  # an FP8 weight held dequantized
                    scale_info = tensors[target.scale_of]
                    scale = torch.empty(scale_info.shape, dtype=_DTYPES[scale_info.dtype])
                    scale_fd = os.open(model_dir / scale_info.file, os.O_RDONLY)
                    try:
                        _pread_into(scale_fd, scale_info, scale)
                    finally:
                        os.close(scale_fd)
                    src = dequantize_weight_blocks(src, scale, torch.float32)
                dst.copy_(src)
                del src
        finally:
            os.close(fd)


def _pread_into(fd: int, info: TensorInfo, dst: torch.Tensor) -> None:
    buffer = dst.view(-1).view(torch.uint8).numpy()  # the tensor's own memory, as bytes
    if buffer.nbytes != info.nbytes:
        raise CheckpointError(f"{info.file}: a tensor holds {info.nbytes} bytes, expected {buffer.nbytes}")
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [memoryview(buffer)[done:]], info.offset + done)
        if n <= 0:
            raise CheckpointError(f"{info.file} ends before its tensor data ({info.offset + done} bytes)")
        done += n


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")
