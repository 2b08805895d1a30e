"""Shared fixtures: small checkpoints made once per test session, and the transformers oracle."""

from __future__ import annotations

import os

# Triton kernel tests run under Triton's interpreter on CPU tensors. Triton reads this variable
# when @triton.jit decorates a function, and its own library functions (tl.cdiv, tl.max, ...) are
# decorated when triton.language is first imported, so it is set here, before anything in the
# process can import triton. TRITON_INTERPRET=0 keeps kernels compiled (their tests then skip).
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

from glm5c.batch import SeqChunk, build_step_batch
from glm5c.kv_cache import KVCache
from glm5c.model import GLM5
from glm5c.tools.make_tiny_checkpoint import make_checkpoint

torch.set_num_threads(1)  # tiny models: threads only add synchronisation

# Two more random configs beside the tiny preset, for the oracle tests.
CONFIG_B = {  # GLM-5-like routing (one group), every layer its own indexer, two dense layers
    "hidden_size": 96, "num_hidden_layers": 3, "first_k_dense_replace": 2, "indexer_types": None,
    "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 48, "kv_lora_rank": 24,
    "qk_nope_head_dim": 12, "qk_rope_head_dim": 16, "v_head_dim": 20, "n_group": 1, "topk_group": 1,
    "n_routed_experts": 6, "num_experts_per_tok": 3, "index_n_heads": 16, "index_head_dim": 32,
    "index_topk": 8, "intermediate_size": 80, "moe_intermediate_size": 24,
}  # fmt: skip
CONFIG_C = {  # several shared-indexer layers, 4 groups / 2 kept, two shared experts, no MTP layer
    "num_hidden_layers": 5, "first_k_dense_replace": 1,
    "indexer_types": ["full", "shared", "shared", "full", "shared"],
    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "n_shared_experts": 2, "num_nextn_predict_layers": 0, "index_topk": 12, "routed_scaling_factor": 1.5,
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_fp8_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp8", "tiny", seed=0, fp8=True)


@pytest.fixture(scope="session")
def config_b_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "b", "tiny", seed=1, overrides=CONFIG_B)


@pytest.fixture(scope="session")
def config_c_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", "tiny", seed=2, overrides=CONFIG_C)


TINY_BUCKETS = (1, 4)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_dir, tmp_path_factory) -> Path:
    """`glm5c compile` output for the tiny checkpoint: buckets 1 and 4, block size 4, 128 tokens."""
    from glm5c.graphs.buckets import Buckets
    from glm5c.graphs.compile import compile_artifacts, compile_count

    before = compile_count()
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    compile_artifacts(tiny_dir, out, Buckets(TINY_BUCKETS), block_size=4, max_model_len=128, progress=lambda _: None)
    assert compile_count() > before  # the counter sees compilations (so 0 at load means something)
    return out


def load_oracle(model_dir: Path):
    """transformers' GlmMoeDsaForCausalLM in float32 (the MTP layer's tensors are ignored by it)."""
    from transformers import GlmMoeDsaForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return GlmMoeDsaForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, experts_implementation="eager"
        ).eval()
    finally:
        logging.set_verbosity(verbosity)


def forward_all(
    model: GLM5, seqs: list[list[int]], block_size: int = 4, chunk: int | None = None
) -> list[torch.Tensor]:
    """Logits [len(seq), vocab] for every position of every sequence. All sequences run together
    in each step, with non-contiguous block tables; with `chunk`, prefill goes `chunk` tokens at a
    time per sequence (1 = token-by-token decode)."""
    blocks_each = [-(-len(s) // block_size) for s in seqs]
    cache = KVCache(model.config, sum(blocks_each), block_size, model.dtype)
    free = list(range(cache.num_blocks))
    free = free[::2] + free[1::2]  # interleave sequences' blocks
    tables = [[free.pop() for _ in range(n)] for n in blocks_each]
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    while any(d < len(s) for d, s in zip(done, seqs)):
        live = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        chunks = []
        for i in live:
            n = len(seqs[i]) - done[i] if chunk is None else min(chunk, len(seqs[i]) - done[i])
            chunks.append(SeqChunk(seqs[i][done[i] : done[i] + n], done[i], tables[i], all_logits=True))
        batch = build_step_batch(chunks, block_size, cache.pad_slot)
        with torch.inference_mode():
            logits = model.logits(model(batch, cache)[batch.logits_indices])
        row = 0
        for i, c in zip(live, chunks):
            outs[i].append(logits[row : row + len(c.token_ids)])
            row += len(c.token_ids)
            done[i] += len(c.token_ids)
    return [torch.cat(o) for o in outs]
