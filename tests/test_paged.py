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


def test_padding_to_a_bucket_changes_nothing(model):
    """A step padded into a larger bucket (the compiled graphs' inputs) gives the real tokens the
    same outputs, and padding writes only the scratch block."""
    from glm5c.graphs.step import StaticInputs, StepModule, cache_args

    ids = _seqs([20, 3])
    outs = []
    for padded in (False, True):
        cache = KVCache(model.config, num_blocks=8, block_size=4, dtype=torch.float32)
        chunks = [SeqChunk(ids[0], 0, [7, 2, 5, 0, 3], all_logits=True), SeqChunk(ids[1], 0, [6], all_logits=True)]
        batch = build_step_batch(chunks, 4, cache.pad_slot)
        with torch.inference_mode():
            if padded:
                inputs = StaticInputs(32, max_blocks=6, device="cpu")
                inputs.fill(batch, cache.pad_slot, 4)
                hidden = StepModule(model)(*inputs.args(), *cache_args(cache, model.config.num_hidden_layers))
                assert hidden.shape[0] == 32 and (inputs.slot_mapping[23:] == cache.pad_slot).all()
                for layer_cache in cache.latent:  # real blocks 1 and 4 were never touched
                    assert not layer_cache[[1, 4]].any()
            else:
                hidden = model(batch, cache)
            outs.append(model.logits(hidden[:23]))
    assert (outs[0] - outs[1]).abs().max() < 1e-5  # only GEMM blocking differs


def test_step_batch_layout_errors():
    with pytest.raises(ValueError, match="needs 9 cache slots"):
        build_step_batch([SeqChunk(list(range(9)), 0, [0, 1])], 4, pad_slot=8)
    with pytest.raises(ValueError, match="more than max_blocks=1"):
        build_step_batch([SeqChunk([1, 2, 3, 4, 5], 0, [0, 1])], 4, pad_slot=8, max_blocks=1)


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
