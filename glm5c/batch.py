"""One forward step's flat batch: tokens from many sequences (prefill chunks and decodes mixed),
with everything that varies per step held in tensors so a compiled step stays shape-static."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class StepBatch:
    token_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64, position of each token within its sequence
    seq_ids: Tensor  # [T] int64, row of block_tables / seq_lens each token belongs to
    slot_mapping: Tensor  # [T] int64, cache slot each token's entries are written to
    block_tables: Tensor  # [B, max_blocks] int32, cache blocks of each sequence
    seq_lens: Tensor  # [B] int32, context length of each sequence after this step
    logits_indices: Tensor  # [N] int64, tokens whose hidden states go to the LM head

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


@dataclass(frozen=True)
class SeqChunk:
    """The part of one sequence a step runs: `token_ids` at positions start_pos, start_pos + 1, ..."""

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    want_logits: bool = True  # the last token's logits (all tokens' when all_logits)
    all_logits: bool = False


def build_step_batch(
    chunks: Sequence[SeqChunk],
    block_size: int,
    pad_slot: int,
    device: torch.device | str = "cpu",
    max_blocks: int | None = None,
) -> StepBatch:
    """Lay chunks out flat; block tables are `max_blocks` wide (default: the longest), filled up
    with the cache's scratch block (the block holding `pad_slot`). Padding a step to a compiled
    bucket is the graph runner's job (glm5c.graphs.step.StaticInputs)."""
    token_ids: list[int] = []
    positions: list[int] = []
    seq_ids: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    width = max_blocks or max(max((len(c.block_table) for c in chunks), default=1), 1)
    tables: list[list[int]] = []
    seq_lens: list[int] = []
    scratch_block = pad_slot // block_size
    for row, chunk in enumerate(chunks):
        end = chunk.start_pos + len(chunk.token_ids)
        if end > len(chunk.block_table) * block_size:
            raise ValueError(f"sequence {row} needs {end} cache slots but has {len(chunk.block_table)} blocks")
        if len(chunk.block_table) > width:
            raise ValueError(f"sequence {row} has {len(chunk.block_table)} blocks, more than max_blocks={width}")
        first = len(token_ids)
        for i, tok in enumerate(chunk.token_ids):
            pos = chunk.start_pos + i
            token_ids.append(int(tok))
            positions.append(pos)
            seq_ids.append(row)
            slots.append(chunk.block_table[pos // block_size] * block_size + pos % block_size)
        if chunk.all_logits:
            logits_indices.extend(range(first, len(token_ids)))
        elif chunk.want_logits and chunk.token_ids:
            logits_indices.append(len(token_ids) - 1)
        tables.append(list(chunk.block_table) + [scratch_block] * (width - len(chunk.block_table)))
        seq_lens.append(end)
    def tensor(values: list[int], dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return StepBatch(
        token_ids=tensor(token_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        seq_ids=tensor(seq_ids, torch.int64),
        slot_mapping=tensor(slots, torch.int64),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device).reshape(len(tables), width),
        seq_lens=tensor(seq_lens, torch.int32),
        logits_indices=tensor(logits_indices, torch.int64),
    )
