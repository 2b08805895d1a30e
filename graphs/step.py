"""The compiled units — one forward step of the main model, and one step of the MTP layer, over
flat, padded tensors — and the static input buffers a bucket's graph reads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
from torch import Tensor, nn

from glm5c.batch import SeqChunk, StepBatch, lay_out
from glm5c.kv_cache import KVCache
from glm5c.model import GLM5


class StepModule(nn.Module):
    """hidden [T, D] = the model over one step. The cache tensors are inputs the step writes in
    place; their first dim (the block count) stays dynamic, so one graph serves any cache size."""

    def __init__(self, model: GLM5) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        token_ids: Tensor,  # [T]
        positions: Tensor,  # [T]
        seq_ids: Tensor,  # [T]
        slot_mapping: Tensor,  # [T]
        block_tables: Tensor,  # [T + 1, max_blocks]
        seq_lens: Tensor,  # [T + 1]
        latent: list[Tensor],  # per main layer [num_blocks + 1, block_size, kv_cache_dim]
        index_k: list[Tensor],  # per main layer with an indexer [num_blocks + 1, block_size, index_head_dim]
        index_scale: list[Tensor],  # per such layer [num_blocks + 1, block_size] with FP8 keys, else empty
    ) -> Tensor:
        config = self.model.config
        indexed = [config.layer_has_indexer(i) for i in range(config.num_hidden_layers)]
        keys, scales = iter(index_k), iter(index_scale)
        cache = SimpleNamespace(
            latent=latent,
            index_k=[next(keys) if has else None for has in indexed],
            index_scale=[next(scales) if has and index_scale else None for has in indexed],
        )
        batch = StepBatch(token_ids, positions, seq_ids, slot_mapping, block_tables, seq_lens, token_ids[:0])
        return self.model(batch, cache)


class MTPStepModule(nn.Module):
    """mtp_hidden [T, D] = the MTP layer over one step (a catch-up over the positions the main model
    just computed, or one draft step); the draft logits are taken outside, at the rows that need
    them. Reads and writes only the MTP layer's cache tensors."""

    def __init__(self, model: GLM5) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        token_ids: Tensor,  # [T]
        positions: Tensor,  # [T]
        seq_ids: Tensor,  # [T]
        slot_mapping: Tensor,  # [T]
        block_tables: Tensor,  # [T + 1, max_blocks]
        seq_lens: Tensor,  # [T + 1]
        hidden: Tensor,  # [T, D] the hidden states at the positions before token_ids
        latent: list[Tensor],  # [the MTP layer's [num_blocks + 1, block_size, kv_cache_dim]]
        index_k: list[Tensor],  # [its indexer keys [num_blocks + 1, block_size, index_head_dim]]
        index_scale: list[Tensor],  # [its scales [num_blocks + 1, block_size]] with FP8 keys, else []
    ) -> Tensor:
        before = [None] * self.model.config.num_hidden_layers  # main layers: not read
        cache = SimpleNamespace(latent=before + latent, index_k=before + index_k,
                                index_scale=before + (index_scale or [None]))  # fmt: skip
        batch = StepBatch(token_ids, positions, seq_ids, slot_mapping, block_tables, seq_lens, token_ids[:0])
        return self.model.mtp_hidden(batch, cache, hidden)


def mtp_cache_args(cache: KVCache, num_layers: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The MTP layer's cache tensors (layer `num_layers`, after the main ones) in MTPStepModule's order."""
    scale = cache.index_scale[num_layers]
    return [cache.latent[num_layers]], [cache.index_k[num_layers]], [] if scale is None else [scale]


def cache_args(cache: KVCache, num_layers: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The main layers' cache tensors in StepModule's argument order."""
    def present(tensors: list[Tensor | None]) -> list[Tensor]:
        return [t for t in tensors[:num_layers] if t is not None]

    return cache.latent[:num_layers], present(cache.index_k), present(cache.index_scale)


class StaticInputs:
    """One bucket's input buffers. A step is copied in and padded: padding tokens write to the
    cache's scratch slot and belong to an extra sequence row whose blocks are all scratch."""

    def __init__(self, tokens: int, max_blocks: int, device: torch.device | str,
                 hidden: tuple[int, torch.dtype] | None = None) -> None:
        """hidden (width, dtype): also a [tokens, width] buffer of input hidden states (MTP graphs)."""
        self.tokens = tokens
        self.max_blocks = max_blocks

        def buf(*shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.token_ids, self.positions, self.seq_ids, self.slot_mapping = (buf(tokens) for _ in range(4))
        # block tables [tokens + 1, width] at the start of one flat buffer, so a table only as wide
        # as a step's longest sequence (a CPU graph's dynamic width) is a view, not a copy
        self._tables = buf((tokens + 1) * max_blocks, dtype=torch.int32)
        self.seq_lens = buf(tokens + 1, dtype=torch.int32)
        self.hidden = buf(tokens, hidden[0], dtype=hidden[1]) if hidden else None
        self._views: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}  # width -> (tables, the graph's args)
        self._host = None  # numpy views of a CPU's buffers (fill writes through them)
        if self.token_ids.device.type == "cpu":
            ints = [t.numpy() for t in (self.token_ids, self.positions, self.seq_ids, self.slot_mapping)]
            self._host = (ints, self._tables.numpy(), self.seq_lens.numpy())
        self.width = max_blocks  # of the tables the last fill wrote (args() passes them)

    @property
    def block_tables(self) -> Tensor:
        """[tokens + 1, width] int32: each sequence row's blocks, as the last fill wrote them."""
        return self._view(self.width)[0]

    def _view(self, width: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        view = self._views.get(width)
        if view is None:
            tables = self._tables[: (self.tokens + 1) * width].view(self.tokens + 1, width)
            args = (self.token_ids, self.positions, self.seq_ids, self.slot_mapping, tables, self.seq_lens)
            view = self._views[width] = (tables, args if self.hidden is None else (*args, self.hidden))
        return view

    def _host_tables(self, width: int):
        """The numpy view fill writes a CPU's [tokens + 1, width] block tables through."""
        return self._host[1][: (self.tokens + 1) * width].reshape(self.tokens + 1, width)

    def _set_width(self, width: int) -> None:
        if not 1 <= width <= self.max_blocks:
            raise ValueError(f"block tables {width} blocks wide do not fit a bucket of {self.max_blocks} blocks")
        self.width = width

    def fill(self, batch: StepBatch, pad_slot: int, block_size: int, hidden: Tensor | None = None,
             width: int | None = None) -> None:  # fmt: skip
        """Copy `batch` in and pad the rest. `width`: the block tables' columns to lay out (the
        graph's input; default all max_blocks, as a CUDA graph is captured), >= the batch's."""
        n, rows = batch.num_tokens, batch.block_tables.shape[0]
        used = batch.block_tables.shape[1]
        width = self.max_blocks if width is None else width
        if n > self.tokens or rows > self.tokens or used > min(width, self.max_blocks):
            raise ValueError(
                f"step of {n} tokens, {rows} sequences and {used} blocks per sequence does not fit a bucket of "
                f"{self.tokens} tokens and {min(width, self.max_blocks)} blocks"
            )
        self._set_width(width)
        # padding tokens (a step that fills its bucket, as decodes often do, pads none) write only
        # the scratch slot and belong to the first unused row: all scratch blocks
        pads = (0, 0, rows, pad_slot)
        if self._host is not None:  # a CPU's buffers, through numpy: a third of torch's time per copy
            ints, _, lens = self._host
            tables = self._host_tables(width)
            for i, name in enumerate(("token_ids", "positions", "seq_ids", "slot_mapping")):
                ints[i][:n] = getattr(batch, name).numpy()
                ints[i][n:] = pads[i]
            tables.fill(pad_slot // block_size)
            tables[:rows, :used] = batch.block_tables.numpy()
            lens.fill(1)
            lens[:rows] = batch.seq_lens.numpy()
        else:
            for name, pad in zip(("token_ids", "positions", "seq_ids", "slot_mapping"), pads):
                getattr(self, name)[:n].copy_(getattr(batch, name))
                if n < self.tokens:
                    getattr(self, name)[n:] = pad
            tables = self.block_tables
            tables.fill_(pad_slot // block_size)
            tables[:rows, :used].copy_(batch.block_tables)
            self.seq_lens.fill_(1)
            self.seq_lens[:rows].copy_(batch.seq_lens)
        if self.hidden is not None:
            self.hidden[:n].copy_(hidden)
            if n < self.tokens:
                self.hidden[n:] = 0

    def fill_chunks(self, chunks: Sequence[SeqChunk], block_size: int, pad_slot: int, min_width: int = 1) -> int:
        """What fill(build_step_batch(chunks, ...), width=...) writes, laid out from the chunks
        straight into a CPU's buffers (no StepBatch tensors between: in a 16-request decode step
        right after a graph, with its caches cold, ~105 -> ~45 us on the 2-core dev machine), the
        block tables as wide as the longest sequence's, at least `min_width`. -> tokens laid out."""
        if self._host is None:
            raise RuntimeError("fill_chunks writes a CPU's buffers; fill a GPU's from a StepBatch")
        ints, _, lens = self._host
        rows, tokens, longest = len(chunks), 0, 1
        for c in chunks:
            tokens += len(c.token_ids)
            longest = max(longest, len(c.block_table))
        if rows > self.tokens or tokens > self.tokens:
            raise ValueError(f"step of {tokens} tokens from {rows} sequences does not fit a bucket of {self.tokens} tokens")
        width = max(min_width, longest)
        if width > self.max_blocks:
            raise ValueError(f"a sequence has {longest} blocks, more than max_blocks={self.max_blocks}")
        self._set_width(width)
        tables = self._host_tables(width)
        tables.fill(pad_slot // block_size)
        lens.fill(1)
        n = lay_out(chunks, block_size, ints, tables, lens)
        for buffer, pad in zip(ints, (0, 0, rows, pad_slot)):  # padding tokens: as fill's
            buffer[n:] = pad
        return n

    def clear(self, pad_slot: int, block_size: int) -> None:
        """Inputs of no real token at full width: every token pads (writes only the scratch slot,
        reads only scratch blocks)."""
        for t in (self.token_ids, self.positions, self.seq_ids):
            t.zero_()
        self.slot_mapping.fill_(pad_slot)
        self._set_width(self.max_blocks)
        self._tables.fill_(pad_slot // block_size)
        self.seq_lens.fill_(1)
        if self.hidden is not None:
            self.hidden.zero_()

    def args(self) -> tuple[Tensor, ...]:
        """The graph's inputs, the block tables as wide as the last fill laid them out (the same
        tensors each time for a width: no copies)."""
        return self._view(self.width)[1]
