"""The paged KV cache: per layer, one MLA entry per token (the 512-wide latent followed by the
64-wide RoPE key; 576 values for GLM-5) and, for layers that run their own indexer, the
indexer's key per token (128 values for GLM-5). Both live in fixed-size blocks:

    latent[layer]  [num_blocks + 1, block_size, kv_lora_rank + qk_rope_head_dim]
    index_k[layer] [num_blocks + 1, block_size, index_head_dim]   (None on `shared` layers)
    index_scale[layer] [num_blocks + 1, block_size] fp32           (FP8 index keys only)

A token's slot is block * block_size + offset; a sequence finds its blocks through its row of
the block table. The extra last block is scratch: padding tokens write there
(`pad_slot`), so every step writes a fixed number of rows and stays shape-static.
Layers are numbered as in the checkpoint, the MTP layers after the main ones.
One tensor per layer (not one stacked tensor) so an in-place write touches only its rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        num_layers: int | None = None,
        index_dtype: torch.dtype | None = None,
    ) -> None:
        """index_dtype: the indexer keys' dtype (default: `dtype`); float8_e4m3fn stores them as
        GLM-5's production engines do, 128 fp8 bytes plus an fp32 scale per token."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = config.num_layers_with_mtp if num_layers is None else num_layers
        rows = (num_blocks + 1, block_size)
        self.latent: list[Tensor] = [
            torch.zeros(*rows, config.kv_cache_dim, dtype=dtype, device=device) for _ in range(self.num_layers)
        ]
        index_dtype = index_dtype or dtype
        fp8 = index_dtype == torch.float8_e4m3fn
        indexed = [config.layer_has_indexer(layer) for layer in range(self.num_layers)]
        self.index_k: list[Tensor | None] = [
            torch.zeros(*rows, config.index_head_dim, dtype=index_dtype, device=device) if has else None
            for has in indexed
        ]
        self.index_scale: list[Tensor | None] = [
            torch.zeros(*rows, dtype=torch.float32, device=device) if has and fp8 else None for has in indexed
        ]

    @property
    def pad_slot(self) -> int:
        """The first slot of the scratch block, where padding tokens write."""
        return self.num_blocks * self.block_size

    @property
    def bytes_per_token(self) -> int:
        tensors = self.latent + self.index_k + self.index_scale
        return sum(t[0, 0].nbytes for t in tensors if t is not None)

    @staticmethod
    def write(cache: Tensor, slot_mapping: Tensor, rows: Tensor) -> None:
        """cache [num_blocks + 1, block_size, W] <- rows [T, W] at slot_mapping [T].
        One index_put_ on the whole per-layer tensor (not through a reshaped view), which a
        compiled graph turns into a write of just these rows."""
        block_size = cache.shape[1]
        cache.index_put_((slot_mapping // block_size, slot_mapping % block_size), rows.to(cache.dtype))
