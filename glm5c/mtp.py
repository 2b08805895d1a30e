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
verified tokens. Drafts are drawn with each request's own sampling parameters (argmax for greedy
requests), and their distributions kept: verification (`verify`) runs [last token, d1..dk]
through the main model and applies rejection sampling (glm5c/rejection.py), so the output is
distributed exactly as without drafts (greedy requests: identical tokens). Requests with
penalties do not draft (a draft would change the counts its successors see), nor do requests
asking for logprobs (verification reports none).
With compiled artifacts the MTP layer runs through its own graph per bucket (graphs/step.py:
MTPStepModule, built by `glm5c compile` beside the main model's), the draft logits and sampling
outside it, as for the main model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .batch import SeqChunk, StepBatch, build_step_batch
from .block_manager import BlockManager
from .kv_cache import KVCache
from .model import GLM5
from .rejection import rejection_sample
from .sampling import SamplingBatch, sample, sampling_probs
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
    def __init__(
        self, model: GLM5, cache: KVCache, blocks: BlockManager, num_tokens: int,
        mtp_hidden: Callable[[StepBatch, KVCache, Tensor], Tensor] | None = None,
    ) -> None:  # fmt: skip
        """mtp_hidden: runs the MTP layer over a step (a compiled runner's `mtp`); default: eagerly."""
        if model.mtp is None:
            raise ValueError("speculative decoding needs the checkpoint's MTP layer, and this model has none")
        self.model, self.cache, self.blocks, self.k = model, cache, blocks, num_tokens
        self.mtp_hidden = mtp_hidden or model.mtp_hidden
        self.stats = DraftStats()

    def _forward(self, batch: StepBatch, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """-> draft logits [N, vocab] at batch.logits_indices, MTP hidden states [T, D]."""
        with torch.inference_mode():
            x = self.mtp_hidden(batch, self.cache, hidden)
            return self.model.mtp_logits(x[batch.logits_indices]), x

    def catch_up_and_draft(self, entries: list[CatchUp]) -> None:
        """Write the MTP cache for `entries` and set each drafting sequence's `draft` and
        `draft_probs` [k, V]."""
        entries = [e for e in entries if e.hidden.shape[0] > 0]
        for e in entries:
            e.seq.draft, e.seq.draft_probs = [], None
        if not entries:
            return
        chunks = []
        for e in entries:
            count = e.hidden.shape[0]
            params = e.seq.params
            drafting = (e.wants_draft and not params.penalized and params.logprobs is None
                        and self._room_for_drafts(e.seq))  # fmt: skip
            e.wants_draft = drafting
            chunks.append(SeqChunk(e.seq.tokens[e.start + 1 : e.start + 1 + count], e.start,
                                   self.blocks.tables[e.seq.id], want_logits=drafting))  # fmt: skip
        batch = build_step_batch(chunks, self.blocks.block_size, self.cache.pad_slot, self.cache_device)
        logits, mtp_hidden = self._forward(batch, torch.cat([e.hidden for e in entries]))
        drafting = [e.seq for e in entries if e.wants_draft]
        if not drafting:
            return
        hidden = mtp_hidden[batch.logits_indices]  # [N, D] at each drafting sequence's last position
        probs = []
        for j in range(self.k):
            draws = _sampling_batch(drafting, j, logits.shape[-1], logits.device)  # draft j: len(tokens) + j
            probs.append(sampling_probs(logits, draws))  # [N, V]
            for seq, token in zip(drafting, sample(logits, draws).token_ids.tolist()):
                seq.draft.append(token)
            if j == self.k - 1:
                break
            step = [SeqChunk([seq.draft[-1]], len(seq.tokens) - 1 + j, self.blocks.tables[seq.id]) for seq in drafting]
            batch = build_step_batch(step, self.blocks.block_size, self.cache.pad_slot, self.cache_device)
            logits, hidden = self._forward(batch, hidden)
        for seq, q in zip(drafting, torch.stack(probs, dim=1)):  # [N, k, V]
            seq.draft_probs = q
        self.stats.drafted += self.k * len(drafting)

    @property
    def cache_device(self) -> torch.device:
        return self.cache.latent[0].device

    def _room_for_drafts(self, seq: Sequence) -> bool:
        """Blocks for the verify step's last position (and the drafts' MTP entries before it)."""
        return self.blocks.grow(seq.id, len(seq.tokens) + self.k)


def verify(seqs: list[Sequence], target_logits: Tensor) -> list[list[int]]:
    """Rejection-sample each sequence's drafts against the main model's logits
    target_logits [N, k+1, V] (at the fresh token and each draft). -> the tokens to emit per
    sequence: the accepted drafts, then one token from the target (a correction or a bonus)."""
    n, slots, vocab = target_logits.shape
    expanded = [(seq, j) for seq in seqs for j in range(slots)]
    penalized = any(s.params.penalized for s in seqs)  # (only penalties read the token lists)
    target_batch = SamplingBatch.from_params(
        [s.params for s, _ in expanded], [s.output if penalized else [] for s, _ in expanded],
        [s.tokens[: s.prompt_len] if penalized else [] for s, _ in expanded], [len(s.tokens) + j for s, j in expanded],
        vocab, target_logits.device,
    )  # fmt: skip
    p = sampling_probs(target_logits.reshape(n * slots, vocab), target_batch).view(n, slots, vocab)
    q = torch.stack([s.draft_probs for s in seqs])  # [N, k, V]
    drafts = torch.tensor([s.draft for s in seqs], dtype=torch.int64, device=target_logits.device)
    rows = _sampling_batch(seqs, 0, vocab, target_logits.device)
    accepted, out = rejection_sample(p, q, drafts, rows.greedy, rows.seeds, rows.positions)
    return [ids[: a + 1] for ids, a in zip(out.tolist(), accepted.tolist())]


def _sampling_batch(seqs: list[Sequence], offset: int, vocab: int, device: torch.device) -> SamplingBatch:
    """Sampling rows for the token at len(tokens) + offset of each sequence."""
    penalized = any(s.params.penalized for s in seqs)  # (only penalties read the token lists)
    return SamplingBatch.from_params(
        [s.params for s in seqs], [s.output if penalized else [] for s in seqs],
        [s.tokens[: s.prompt_len] if penalized else [] for s in seqs], [len(s.tokens) + offset for s in seqs], vocab,
        device,
    )  # fmt: skip
