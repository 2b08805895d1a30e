"""Put glibc's allocator in the same state for every run a benchmark compares.

glibc serves allocations above a threshold (128 KiB at start) with fresh mmap'd pages, and raises
that threshold (up to 32 MiB) the first time such a block is freed. Code that allocates and frees
large tensors every step, as transformers' generate does (its KV cache grows by torch.cat), runs
far faster once the threshold has risen: on the 2-core dev machine, generate of the mini preset
at batch 16 took 2.7 s in a fresh process and 1.46 s after one 30 MiB tensor had been freed
(2026-11-30). Whichever run of a comparison came first would otherwise pay for it alone.
"""

from __future__ import annotations

import torch


def warm_allocator() -> None:
    """Allocate, touch and free 30 MiB, so that glibc's mmap threshold is at its highest from here on."""
    block = torch.empty(30 * 2**20, dtype=torch.uint8)
    block.fill_(1)
    del block
