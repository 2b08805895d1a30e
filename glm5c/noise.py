"""Counter-based random numbers: uniform noise as a pure function of (seed, position, index).

Each value is SplitMix64 output computed with int64 tensor ops (multiplication wraps mod 2**64,
shifts are made logical by masking), so the noise a request sees depends only on its own seed and
the position of the token being drawn: not on the batch it shares, the step it runs in, the
device, or any generator state. The functions allocate only, never read tensor values on the
host, and so run inside a captured CUDA graph.

Streams keep draws that must be independent apart: the sampler's Gumbel noise (SAMPLE) and the
rejection sampler's acceptance (ACCEPT) and recovery (RECOVER) draws for the same token.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAMPLE, ACCEPT, RECOVER = 0, 1, 2

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # SplitMix64's increment, as a signed int64
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finalizer: a bijection of 64-bit words with full avalanche."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def uniform(seeds: Tensor, positions: Tensor, width: int, stream: int) -> Tensor:
    """seeds, positions: int64 tensors of one (broadcastable) shape S -> [*S, width] float32 in (0, 1).

    Value i is the i-th output of a SplitMix64 generator keyed by (seed, stream, position): 23
    random bits, centred in their interval, so 0 and 1 never occur and -log(-log(u)) is finite."""
    key = _mix(_mix(_mix(seeds) + stream) + positions)  # [*S]
    index = torch.arange(1, width + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN  # [width]
    bits = _shr(_mix(key.unsqueeze(-1) + index), 41)  # [*S, width] in [0, 2**23)
    return bits.float() * 2.0**-23 + 2.0**-24


def gumbel(seeds: Tensor, positions: Tensor, width: int, stream: int) -> Tensor:
    """[*S, width] float32 standard Gumbel noise: argmax(logits + gumbel) samples softmax(logits)."""
    return -torch.log(-torch.log(uniform(seeds, positions, width, stream)))
