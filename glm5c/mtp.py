"""MTP speculative decoding: GLM-5's multi-token-prediction layer drafts k tokens per decoding
request, and the main model checks them all in its next step.

The MTP layer at position p reads the token at p + 1 and the main model's hidden state at p,
and predicts the token at p + 2; it has its own KV cache layer, in the same blocks as the main
layers. After every main step the drafter
  1. catches up: runs the MTP layer over the positions the main model just computed (their next
     tokens are now known), writing its cache there, and
  2. drafts: from the last of those positions it predicts d1, then feeds d1 (with the MTP
     layer's own hidden state) to predict d2, and so on up to dk, one small step each.
Draft positions are written speculatively and rewritten by a later catch-up once they hold
verified tokens. Verification (glm5c/engine.py) runs [last token, d1..dk] through the main
model: greedy requests keep the drafts that match the main model's argmax, then its next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import SeqChunk, build_step_batch
from .block_manager import BlockManager
from .kv_cache import KVCache
from .model import GLM5
from .scheduler import Sequence


@dataclass
class CatchUp:
    """Positions [start, start + count) of `seq` the main model computed this step, and their hidden states."""

    seq: Sequence
    start: int
    hidden: Tensor  # [count, D]
    wants_draft: bool  # the sequence has a fresh, uncomputed token to draft after


@dataclass
class DraftStats:
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accept_length(self) -> float:
        """Tokens emitted per verify step per request: 1 + accepted drafts."""
        return 1 + self.accepted / self.verify_steps if self.verify_steps else 0.0


class Drafter:
    def __init__(self, model: GLM5, cache: KVCache, blocks: BlockManager, num_tokens: int) -> None:
        if model.mtp is None:
            raise ValueError("speculative decoding needs the checkpoint's MTP layer, and this model has none")
        self.model, self.cache, self.blocks, self.k = model, cache, blocks, num_tokens
        self.stats = DraftStats()

    def catch_up_and_draft(self, entries: list[CatchUp]) -> None:
        """Write the MTP cache for `entries` and set each drafting sequence's `draft`. Only plain
        greedy requests draft (verified by argmax); sampled or penalized requests decode one
        token per step until rejection sampling (glm5c/rejection.py) is wired in."""
        entries = [e for e in entries if e.hidden.shape[0] > 0]
        for e in entries:
            e.seq.draft = []
        if not entries:
            return
        chunks = []
        for e in entries:
            count = e.hidden.shape[0]
            params = e.seq.params
            drafting = e.wants_draft and params.greedy and not params.penalized and self._room_for_drafts(e.seq)
            e.wants_draft = drafting
            chunks.append(SeqChunk(e.seq.tokens[e.start + 1 : e.start + 1 + count], e.start,
                                   self.blocks.tables[e.seq.id], want_logits=drafting))  # fmt: skip
        batch = build_step_batch(chunks, self.blocks.block_size, self.cache.pad_slot, self.cache_device)
        with torch.inference_mode():
            logits, mtp_hidden = self.model.mtp_forward(batch, self.cache, torch.cat([e.hidden for e in entries]))
        drafting = [e.seq for e in entries if e.wants_draft]
        if not drafting:
            return
        last_rows = batch.logits_indices  # the last position of each drafting sequence
        tokens = logits.argmax(-1)  # [N]
        hidden = mtp_hidden[last_rows]  # [N, D]
        for j in range(self.k):
            for seq, token in zip(drafting, tokens.tolist()):
                seq.draft.append(token)
            if j == self.k - 1:
                break
            step = [SeqChunk([seq.draft[-1]], len(seq.tokens) - 1 + j, self.blocks.tables[seq.id]) for seq in drafting]
            batch = build_step_batch(step, self.blocks.block_size, self.cache.pad_slot, self.cache_device)
            with torch.inference_mode():
                logits, hidden = self.model.mtp_forward(batch, self.cache, hidden)
            tokens = logits.argmax(-1)
        self.stats.drafted += self.k * len(drafting)

    @property
    def cache_device(self) -> torch.device:
        return self.cache.latent[0].device

    def _room_for_drafts(self, seq: Sequence) -> bool:
        """Blocks for the verify step's last position (and the drafts' MTP entries before it)."""
        return self.blocks.grow(seq.id, len(seq.tokens) + self.k)


def accept_greedy(draft: list[int], target: list[int]) -> int:
    """How many leading drafts equal the main model's argmax at the same positions
    (target has one more entry: the token after the last draft)."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target[accepted]:
        accepted += 1
    return accepted
