"""One forward step's flat batch: tokens from many sequences (prefill chunks and decodes mixed),
with everything that varies per step held in tensors so a compiled step stays shape-static."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
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


class SeqChunk(NamedTuple):
    """The part of one sequence a step runs: `token_ids` at positions start_pos, start_pos + 1, ...
    (A named tuple: built per sequence per step, a third of a frozen dataclass's time.)"""

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    want_logits: bool = True  # the last token's logits (all tokens' when all_logits)
    all_logits: bool = False


def logits_rows(chunks: Sequence[SeqChunk]) -> list[int] | None:
    """The rows of the chunks' flat layout whose logits are wanted; None when every row's is (a
    decode step: no gather needed)."""
    if all(c.want_logits and len(c.token_ids) == 1 for c in chunks):
        return None
    rows: list[int] = []
    first = 0
    for c in chunks:
        n = len(c.token_ids)
        if c.all_logits:
            rows.extend(range(first, first + n))
        elif c.want_logits and n:
            rows.append(first + n - 1)
        first += n
    return rows


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
    num_tokens, rows = sum(len(c.token_ids) for c in chunks), len(chunks)
    width = max_blocks or max(max((len(c.block_table) for c in chunks), default=1), 1)
    ints = np.empty((4, num_tokens), dtype=np.int64)
    tables = np.full((rows, width), pad_slot // block_size, dtype=np.int32)
    seq_lens = np.empty(rows, dtype=np.int32)
    lay_out(chunks, block_size, ints, tables, seq_lens)
    token_ids, positions, seq_ids, slots = _tensor(ints, device).unbind(0)
    logits_indices = logits_rows(chunks)
    logits_indices = np.arange(num_tokens) if logits_indices is None else np.array(logits_indices, dtype=np.int64)
    return StepBatch(token_ids, positions, seq_ids, slots, _tensor(tables, device), _tensor(seq_lens, device),
                     _tensor(logits_indices, device))  # fmt: skip


def lay_out(chunks: Sequence[SeqChunk], block_size: int, ints: np.ndarray, tables: np.ndarray,
            seq_lens: np.ndarray) -> int:  # fmt: skip
    """Write the chunks flat into host arrays: ints, four [>= T] int64 rows (token ids, positions,
    each token's sequence row, its cache slot), each sequence's blocks at the start of its row of
    tables [>= B, W] int32 (the rest of the row left as it is), seq_lens [>= B] its length after the
    step. -> T, the tokens written. (build_step_batch's layout, and a CPU runner's straight into its
    buffers: graphs.step.StaticInputs.fill_chunks.)"""
    width = tables.shape[1]
    n = 0
    for row, (token_ids, start, table, *_) in enumerate(chunks):
        count = len(token_ids)
        end = start + count
        if end > len(table) * block_size:
            raise ValueError(f"sequence {row} needs {end} cache slots but has {len(table)} blocks")
        if len(table) > width:
            raise ValueError(f"sequence {row} has {len(table)} blocks, more than max_blocks={width}")
        if count == 1:  # (a decode)
            ints[0][n] = token_ids[0]
            ints[1][n] = start
            ints[2][n] = row
            ints[3][n] = table[start // block_size] * block_size + start % block_size
        else:
            ints[0][n : n + count] = token_ids
            ints[1][n : n + count] = range(start, end)
            ints[2][n : n + count] = row
            ints[3][n : n + count] = [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        tables[row, : len(table)] = table
        seq_lens[row] = end
        n += count
    return n


def _tensor(values: np.ndarray, device: torch.device | str) -> Tensor:
    """A host array as a tensor on `device` (on a CPU sharing its memory)."""
    t = torch.from_numpy(values)
    return t if torch.device(device).type == "cpu" else t.to(device)
