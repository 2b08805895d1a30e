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
    num_tokens = sum(len(c.token_ids) for c in chunks)
    # four int64 fields, one after the other in one list: converted in one call (through numpy),
    # then viewed (a 16-request decode step's: 33 -> 18 us hot on the 2-core dev machine)
    flat: list[int] = [0] * (4 * num_tokens)
    width = max_blocks or max(max((len(c.block_table) for c in chunks), default=1), 1)
    tables: list[int] = []  # [B * width], then seq_lens [B]: int32, one call
    seq_lens: list[int] = []
    scratch_block = pad_slot // block_size
    first = 0
    for row, chunk in enumerate(chunks):
        table, n, start = chunk.block_table, len(chunk.token_ids), chunk.start_pos
        end = start + n
        if end > len(table) * block_size:
            raise ValueError(f"sequence {row} needs {end} cache slots but has {len(table)} blocks")
        if len(table) > width:
            raise ValueError(f"sequence {row} has {len(table)} blocks, more than max_blocks={width}")
        if n == 1:  # (a decode)
            flat[first] = int(chunk.token_ids[0])
            flat[num_tokens + first] = start
            flat[2 * num_tokens + first] = row
            flat[3 * num_tokens + first] = table[start // block_size] * block_size + start % block_size
        else:
            flat[first : first + n] = map(int, chunk.token_ids)
            flat[num_tokens + first : num_tokens + first + n] = range(start, end)
            flat[2 * num_tokens + first : 2 * num_tokens + first + n] = [row] * n
            flat[3 * num_tokens + first : 3 * num_tokens + first + n] = [
                table[pos // block_size] * block_size + pos % block_size for pos in range(start, end)
            ]
        first += n
        tables.extend(table)
        if len(table) < width:
            tables.extend([scratch_block] * (width - len(table)))
        seq_lens.append(end)
    token_ids, positions, seq_ids, slots = _tensor(flat, np.int64, device).view(4, num_tokens).unbind(0)
    int32s = _tensor(tables + seq_lens, np.int32, device)
    logits_indices = logits_rows(chunks)
    rows = len(seq_lens)
    return StepBatch(token_ids, positions, seq_ids, slots, block_tables=int32s[: rows * width].view(rows, width),
                     seq_lens=int32s[rows * width :],
                     logits_indices=_tensor(range(num_tokens) if logits_indices is None else logits_indices, np.int64,
                                            device))  # fmt: skip


def _tensor(values: list[int] | range, dtype: type, device: torch.device | str) -> Tensor:
    """A tensor of `values` (through numpy: a third of torch.tensor's time for a list of ints)."""
    t = torch.from_numpy(np.array(values, dtype=dtype))
    return t if torch.device(device).type == "cpu" else t.to(device)
