"""The paged cache: prefill in chunks and token-by-token decode give the same logits as one full
forward; sequences batched together (non-contiguous blocks) and padding change nothing."""

from __future__ import annotations

import pytest
import torch

from glm5c.batch import SeqChunk, build_step_batch
from glm5c.kv_cache import KVCache
from glm5c.weights import build_model

from .conftest import forward_all


@pytest.fixture(scope="module")
def model(tiny_dir):
    return build_model(tiny_dir, dtype=torch.float32)


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(22, 1300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_and_decode_equal_full_forward(model, chunk):
    seqs = _seqs([7, 40, 61])  # below and well past index_topk (16)
    full = [forward_all(model, [s])[0] for s in seqs]  # each alone, one step
    stepped = forward_all(model, seqs, chunk=chunk)  # together, `chunk` tokens per step
    for f, s in zip(full, stepped):
        assert (f - s).abs().max() < 1e-5


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_size_does_not_matter(model, block_size):
    seqs = _seqs([30, 9], seed=1)
    ref = forward_all(model, seqs, block_size=4)
    other = forward_all(model, seqs, block_size=block_size, chunk=7)
    for a, b in zip(ref, other):
        assert (a - b).abs().max() < 1e-5


def test_padding_tokens_change_nothing(model):
    ids = _seqs([20])[0]
    outs = []
    for pad_to in (None, 32):
        cache = KVCache(model.config, num_blocks=8, block_size=4, dtype=torch.float32)
        batch = build_step_batch([SeqChunk(ids, 0, [7, 2, 5, 0, 3], all_logits=True)], 4, cache.pad_slot,
                                 pad_tokens_to=pad_to)  # fmt: skip
        with torch.inference_mode():
            outs.append(model.logits(model(batch, cache)[batch.logits_indices]))
        if pad_to:
            assert batch.num_tokens == 32 and (batch.slot_mapping[20:] == cache.pad_slot).all()
            # the scratch block took the padding writes; real blocks 1, 4, 6 were never touched
            for layer_cache in cache.latent:
                assert not layer_cache[[1, 4, 6]].any()
    assert (outs[0] - outs[1]).abs().max() < 1e-6  # only GEMM blocking differs


def test_step_batch_layout_errors():
    with pytest.raises(ValueError, match="needs 9 cache slots"):
        build_step_batch([SeqChunk(list(range(9)), 0, [0, 1])], 4, pad_slot=8)
    with pytest.raises(ValueError, match="do not fit"):
        build_step_batch([SeqChunk([1, 2, 3], 0, [0])], 4, pad_slot=8, pad_tokens_to=2)


def test_mtp_layer_uses_its_own_cache_layer(model):
    """The MTP step writes layer num_hidden_layers of the cache and leaves the main layers alone."""
    ids = _seqs([12])[0]
    cache = KVCache(model.config, num_blocks=4, block_size=4, dtype=torch.float32)
    batch = build_step_batch([SeqChunk(ids, 0, [0, 1, 2], all_logits=True)], 4, cache.pad_slot)
    with torch.inference_mode():
        hidden = model(batch, cache)
        before = [t.clone() for t in cache.latent]
        logits, mtp_hidden = model.mtp_forward(batch, cache, hidden)
    n = model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(before[:n], cache.latent[:n]))
    assert cache.latent[n].abs().sum() > 0
    assert logits.shape == (12, model.config.vocab_size) and mtp_hidden.shape == hidden.shape
