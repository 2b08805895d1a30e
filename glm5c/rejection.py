"""Rejection sampling for speculative decoding: verify k draft tokens against the target model so
that the emitted tokens are distributed exactly as if the target had sampled them one by one.

Draft j is accepted with probability min(1, p(x)/q(x)); at the first rejection the token is drawn
from normalize(max(0, p - q)); after k acceptances a bonus token is drawn from p at slot k.
Greedy rows accept while the draft equals the target's argmax, then emit the target's argmax.
Shape-static, no loops, no host syncs: it runs inside a captured CUDA graph.

Its randomness comes from the ACCEPT and RECOVER noise streams, keyed by (seed, position) like
`sample`'s, so it is reproducible and independent of the SAMPLE stream a drafter draws with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import ACCEPT, RECOVER, gumbel, uniform


def rejection_sample(
    target_probs: Tensor, draft_probs: Tensor, draft_ids: Tensor, greedy: Tensor, seeds: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """
    target_probs [N, k+1, V] fp32: the target's sampling distributions (`sampling_probs`) at the k
        draft slots and the bonus slot
    draft_probs [N, k, V] fp32: the distributions the drafts were drawn from
    draft_ids [N, k] int64
    greedy [N] bool, seeds [N] int64: as in SamplingBatch
    positions [N] int64: the sequence position of the first draft token (slot j is at positions + j)
    -> (num_accepted [N] int64 in [0, k],
        output_ids [N, k+1] int64: the accepted drafts, then the target's token, then -1 padding)
    """
    n, k = draft_ids.shape
    vocab = target_probs.shape[-1]
    slots = torch.arange(k + 1, device=draft_ids.device)  # [k+1]
    p = target_probs[:, :k].gather(2, draft_ids.unsqueeze(2)).squeeze(2)  # [N, k]
    q = draft_probs.gather(2, draft_ids.unsqueeze(2)).squeeze(2)  # [N, k]
    u = uniform(seeds.unsqueeze(1), positions.unsqueeze(1) + slots[:k], 1, ACCEPT).squeeze(2)  # [N, k]
    target_argmax = target_probs.argmax(-1)  # [N, k+1]
    accept = torch.where(greedy.unsqueeze(1), draft_ids == target_argmax[:, :k], u * q < p)  # u < p/q, q = 0 safe
    num_accepted = accept.long().cumprod(1).sum(1)  # [N]: the leading run of acceptances

    # The token at slot a = num_accepted: from max(0, p - q) after a rejection; from p at slot k,
    # where the zero padding of q makes the same formula give p.
    at = num_accepted.view(n, 1, 1).expand(n, 1, vocab)
    p_at = target_probs.gather(1, at).squeeze(1)  # [N, V]
    q_at = F.pad(draft_probs, (0, 0, 0, 1)).gather(1, at).squeeze(1)  # [N, V]
    residual = (p_at - q_at).clamp(min=0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)  # rounding left nothing: p
    recovered = (residual.log() + gumbel(seeds, positions + num_accepted, vocab, RECOVER)).argmax(-1)  # [N]
    last = torch.where(greedy, target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1), recovered)

    output_ids = torch.where(slots < num_accepted.unsqueeze(1), F.pad(draft_ids, (0, 1)), -1)  # [N, k+1]
    return num_accepted, output_ids.scatter(1, num_accepted.unsqueeze(1), last.unsqueeze(1))
