"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (the largest compiled bucket). Running sequences go first, oldest
first: a decode takes one token, a prefill in progress takes its next chunk. Then waiting
sequences are admitted in arrival order while budget, sequence slots and KV blocks last, each
starting with the first chunk of its prompt (minus what the prefix cache already holds). When a
running sequence needs a block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed from its prompt and
the tokens it already generated. The queue is bounded; a full queue rejects new requests.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .block_manager import BlockManager
from .sampling import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the request was not accepted."""


class PromptTooLongError(ValueError):
    """A request's prompt + max_tokens exceed the context, or need more KV blocks than exist."""


@dataclass
class Sequence:
    id: str
    prompt_len: int
    tokens: list[int]  # prompt, then generated tokens
    params: SamplingParams
    arrival: int
    num_computed: int = 0  # leading tokens whose cache entries are written
    finish_reason: str | None = None
    num_preemptions: int = 0
    draft: list[int] = field(default_factory=list)  # MTP draft tokens to verify after tokens[-1]
    draft_probs: Any = None  # [k, V] tensor: the distributions the drafts were drawn from
    first_scheduled_s: float | None = None  # time.monotonic() when it was first admitted to a step
    cached_tokens: int = 0  # prompt tokens the prefix cache held at that first admission

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def num_output(self) -> int:
        """len(output), without copying it."""
        return len(self.tokens) - self.prompt_len

    @property
    def pending(self) -> int:
        """Tokens the next step would compute: the rest of the prompt, or the fresh token plus drafts."""
        return len(self.tokens) - self.num_computed + len(self.draft)


class Chunk:
    """The part of a sequence one step computes. (A slotted class: one per sequence per step,
    built in a quarter of a frozen dataclass's time.)"""

    __slots__ = ("seq", "start", "num_tokens", "needs_logits")

    def __init__(self, seq: Sequence, start: int, num_tokens: int) -> None:
        self.seq = seq
        self.start = start  # first position this step computes
        self.num_tokens = num_tokens
        # the chunk reaches the sequence's last token (and drafts) as scheduled, so next tokens are
        # sampled (fixed here: the step reads it many times, and after the sequence grows)
        self.needs_logits = start + num_tokens == len(seq.tokens) + len(seq.draft)

    def __repr__(self) -> str:
        return f"Chunk({self.seq.id!r}, start={self.start}, num_tokens={self.num_tokens})"

    @property
    def token_ids(self) -> list[int]:
        end = self.start + self.num_tokens
        if not self.seq.draft:  # (no copy of the whole sequence per step)
            return self.seq.tokens[self.start : end]
        return (self.seq.tokens + self.seq.draft)[self.start : end]


@dataclass
class SchedulerStats:
    preemptions: int = 0
    steps: int = 0
    scheduled_tokens: int = 0


class Scheduler:
    def __init__(self, blocks: BlockManager, max_tokens_per_step: int, max_seqs: int, max_waiting: int) -> None:
        if min(max_tokens_per_step, max_seqs, max_waiting) < 1:
            raise ValueError("max_tokens_per_step, max_seqs and max_waiting must be >= 1")
        self.blocks = blocks
        self.max_tokens_per_step = max_tokens_per_step
        self.max_seqs = max_seqs
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        needed = self.blocks.blocks_for(len(seq.tokens) + seq.params.max_tokens)
        if needed > self.blocks.num_blocks:
            raise PromptTooLongError(
                f"request {seq.id!r} needs {needed} KV blocks for {len(seq.tokens)} prompt tokens + max_tokens "
                f"{seq.params.max_tokens}, more than the whole cache ({self.blocks.num_blocks} blocks)"
            )
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.id == seq_id:
                    queue.remove(seq)
                    self.blocks.free_sequence(seq_id)
                    return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.running.remove(seq)
        self.blocks.free_sequence(seq.id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.max_tokens_per_step
        chunks: list[Chunk] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.pending > budget:
                seq.draft, seq.draft_probs = [], None  # drafts are verified whole or not at all
            n = min(seq.pending, budget)
            while not self.blocks.grow(seq.id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                chunks.append(Chunk(seq, seq.num_computed, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            cached = self.blocks.allocate_prompt(seq.id, seq.tokens)
            if cached is None:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s, seq.cached_tokens = time.monotonic(), cached
            seq.num_computed = cached
            self.running.append(seq)
            n = min(len(seq.tokens) - cached, budget)
            chunks.append(Chunk(seq, cached, n))
            budget -= n
        self.stats.steps += 1
        self.stats.scheduled_tokens += self.max_tokens_per_step - budget
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq.id)
        seq.num_computed = 0
        seq.draft, seq.draft_probs = [], None
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)
