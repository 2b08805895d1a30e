"""How far a step is from the machine's physical limits: the bytes a decode step must move and
the flops it must do, against this machine's measured read bandwidth and matmul peak.

A decode step of `batch` requests at `context` tokens must read every weight except the routed
experts no token picked (expected fraction 1 - (1 - k/E)^batch) and the one embedding row per
token, plus the KV entries attention reads (the latent cache and the indexer keys); it must do
2 flops per active parameter per token, plus attention over min(context, index_topk) positions
(absorbed MLA: scores over the 576-wide latent, values over the 512-wide part) and the indexer's
scores over the whole context.
"""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth_bytes_per_s(device: str | torch.device = "cpu", nbytes: int = 1 << 30) -> float:
    """Summing a `nbytes` tensor, best of 5."""
    device = torch.device(device)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def matmul_peak_flops_per_s(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """An n x n x n matmul, best of 5."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _split_params(model) -> tuple[int, int, int]:
    """-> (bytes of routed-expert weights, bytes of everything else but the embedding, embedding bytes),
    main model only (the MTP layer is not part of a plain decode step)."""
    experts = other = 0
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith("mtp."):
            continue
        if name.endswith("kv_b_proj.weight") and name.replace("kv_b_proj.weight", "w_uk_t") in params:
            continue  # MLA's absorbed weights held as blocked copies (MLAttention.pack_absorbed): a step reads those
        if ".mlp.experts." in name:
            experts += p.nbytes
        else:
            other += p.nbytes
    embed = model.embed_tokens.weight.nbytes
    return experts, other - embed, embed


def step_floor_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` requests at `context` tokens must read."""
    config = model.config
    experts, other, embed = _split_params(model)
    e, k = config.n_routed_experts, config.num_experts_per_tok
    touched = 1 - (1 - k / e) ** batch  # expected fraction of experts some token picks
    element = model.dtype.itemsize
    kv_per_token = sum(
        config.kv_cache_dim + (config.index_head_dim if config.layer_has_indexer(i) else 0)
        for i in range(config.num_hidden_layers)
    ) * element
    row = embed / config.vocab_size
    return other + touched * experts + batch * row + batch * context * kv_per_token


def step_flops(model, batch: int, context: int) -> float:
    """Flops of one decode step of `batch` requests at `context` tokens."""
    config = model.config
    experts, other, _ = _split_params(model)
    element = model.dtype.itemsize
    active_params = (other + experts * config.num_experts_per_tok / config.n_routed_experts) / element
    flops = 2 * active_params * batch
    attended = min(context, config.index_topk)
    heads = config.num_attention_heads
    for i in range(config.num_hidden_layers):
        flops += batch * 2 * heads * attended * (config.kv_cache_dim + config.kv_lora_rank)
        if config.layer_has_indexer(i):
            flops += batch * 2 * config.index_n_heads * config.index_head_dim * context
    return flops


def roofline(model, batch: int, context: int, step_s: float, bandwidth: float, peak: float) -> dict:
    """A step's distance from its limits: the larger of the memory and compute floors."""
    nbytes, flops = step_floor_bytes(model, batch, context), step_flops(model, batch, context)
    floor_s = max(nbytes / bandwidth, flops / peak)
    return {
        "batch": batch, "context": context, "step_ms": step_s * 1e3, "bytes": nbytes, "flops": flops,
        "memory_floor_ms": nbytes / bandwidth * 1e3, "compute_floor_ms": flops / peak * 1e3,
        "bound": "memory" if nbytes / bandwidth >= flops / peak else "compute",
        "achieved_GBps": nbytes / step_s / 1e9, "achieved_TFLOPs": flops / step_s / 1e12,
        "floor_over_step": floor_s / step_s,
    }  # fmt: skip
