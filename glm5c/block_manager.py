"""KV cache blocks: a pool of fixed-size blocks, each sequence's block table, and a prefix cache.

A full block is identified by a hash chained over every token up to its end, so two sequences
whose prompts share a prefix share its blocks (with reference counts), including the DSA
indexer's keys, which live in the same blocks. Freed blocks keep their contents and hash until
the pool needs them again (least recently freed first), so a later request can still hit them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class PrefixCacheStats:
    queried_blocks: int = 0
    hit_blocks: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU order
        self.block_hash: dict[int, int] = {}  # block -> hash of the full block it holds
        self.cached: dict[int, int] = {}  # hash -> block
        self.tables: dict[str, list[int]] = {}  # sequence -> its blocks
        self.hashed: dict[str, tuple[int, int]] = {}  # sequence -> (leading blocks hashed, chain hash)
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_prompt(self, seq_id: str, token_ids: list[int]) -> int | None:
        """Give a new sequence blocks for all of token_ids, reusing cached full blocks of its
        prefix. -> the number of leading tokens whose cache entries are already there, or None
        (nothing allocated) when the pool is short. The block holding the last token is never
        taken from the cache: that token must run to produce the next token's logits."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        needed = self.blocks_for(len(token_ids))
        reusable, chain = self._cached_prefix(token_ids) if self.prefix_caching else ([], 0)
        fresh = needed - len(reusable)
        free_after_reuse = self.num_free_blocks - sum(1 for b in reusable if self.ref_counts[b] == 0)
        if fresh > free_after_reuse:
            return None
        for block in reusable:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        table = reusable + [self._take_free() for _ in range(fresh)]
        self.tables[seq_id] = table
        self.hashed[seq_id] = (len(reusable), chain)
        return len(reusable) * self.block_size

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Make the sequence's table hold num_tokens; False (and no change) if the pool is short."""
        table = self.tables[seq_id]
        extra = self.blocks_for(num_tokens) - len(table)
        if extra <= 0:  # (most decode steps)
            return True
        if extra > self.num_free_blocks:
            return False
        table.extend(self._take_free() for _ in range(extra))
        return True

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Register the sequence's blocks that are full and computed, so later prompts can share them."""
        if not self.prefix_caching:
            return
        table = self.tables[seq_id]
        done, h = self.hashed[seq_id]
        full = min(num_computed // self.block_size, len(table))
        for i in range(done, full):
            h = self._chain(h, token_ids, i)
            block = table[i]
            if h not in self.cached and block not in self.block_hash:
                self.cached[h] = block
                self.block_hash[block] = h
        if full > done:
            self.hashed[seq_id] = (full, h)

    def free_sequence(self, seq_id: str) -> None:
        for block in reversed(self.tables.pop(seq_id, [])):  # the tail is the least reusable: evict it first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        self.hashed.pop(seq_id, None)

    def _chain(self, h: int, token_ids: list[int], block_index: int) -> int:
        """The hash of a full block: chained over the previous blocks' hash and its own tokens."""
        start = block_index * self.block_size
        return hash((h, tuple(token_ids[start : start + self.block_size])))

    def _cached_prefix(self, token_ids: list[int]) -> tuple[list[int], int]:
        """-> (cached blocks of the longest cached prefix, the chain hash after them)."""
        blocks: list[int] = []
        h = 0
        usable = (len(token_ids) - 1) // self.block_size  # full blocks before the last token
        for i in range(usable):
            nxt = self._chain(h, token_ids, i)
            self.stats.queried_blocks += 1
            block = self.cached.get(nxt)
            if block is None:
                break
            self.stats.hit_blocks += 1
            blocks.append(block)
            h = nxt
        return blocks, h

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed
        old = self.block_hash.pop(block, None)
        if old is not None:
            del self.cached[old]
        self.ref_counts[block] = 1
        return block
