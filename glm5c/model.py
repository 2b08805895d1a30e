"""GLM-5: the model's math, top to bottom.

    x = embed(tokens)
    per layer:  h = x + MLA(RMSNorm(x));  x = h + MLP(RMSNorm(h))     (MLP: dense SwiGLU or MoE)
    logits = lm_head(RMSNorm(x))
    MTP:        h = eh_proj([enorm(embed(next_token)), hnorm(hidden)]) -> one decoder layer -> head

One step runs a flat batch of tokens from many sequences (`StepBatch`) against the paged
`KVCache`. Attention is MLA in the absorbed form: queries are folded through kv_b_proj's key
half, so heads attend directly over the cached 576-wide entries (512 latent + 64 RoPE key), and
values come out through its value half. DeepSeek Sparse Attention picks, per token, the
`index_topk` best earlier positions with a lightning indexer; attention runs over those only
(all visible positions when the context is no longer than index_topk).

Module and parameter names follow the checkpoint's, so weights load by name. Everything with a
fast kernel is called through `ops` (glm5c.ops.Ops). Head and expert counts are per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import StepBatch
from .config import ModelConfig
from .kv_cache import KVCache
from .ops import REFERENCE, Ops


@dataclass(frozen=True)
class Sharding:
    """This rank's share of the model: attention heads split by tensor parallelism, routed experts
    by expert parallelism. Weight slicing and the collectives arrive with the parallelism work;
    the layer shapes below are already per rank."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    def heads(self, n: int) -> int:
        if n % self.tp_size:
            raise ValueError(f"{n} heads do not split over tp_size={self.tp_size}")
        return n // self.tp_size

    def experts(self, n: int) -> tuple[int, int]:
        """-> (first global expert on this rank, number of local experts)."""
        if n % self.ep_size:
            raise ValueError(f"{n} experts do not split over ep_size={self.ep_size}")
        local = n // self.ep_size
        return self.ep_rank * local, local


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32, cast back, then scale (as GLM-5's reference does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Module):
    """y = x @ W^T. With fp8=True, W is float8_e4m3fn with a [ceil(out/128), ceil(in/128)] fp32
    block scale `weight_scale_inv` (GLM-5-FP8's format)."""

    def __init__(self, in_features: int, out_features: int, ops: Ops, fp8: bool = False, dtype=None,
                 viewed: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.ops = ops
        self.viewed = viewed  # the model reads `weight` itself (as views): it keeps the [out, in] layout
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype), requires_grad=False)
        self.weight_scale_inv = (
            nn.Parameter(torch.empty(-(-out_features // 128), -(-in_features // 128)), requires_grad=False)
            if fp8
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.linear(x, self.weight, self.weight_scale_inv)


def linears(x: Tensor, *layers: Linear) -> list[Tensor]:
    """x through linear layers that all read it: one ops.linear_many call where the ops have one."""
    ops = layers[0].ops
    if ops.linear_many is None:
        return [layer(x) for layer in layers]
    return ops.linear_many(x, [(layer.weight, layer.weight_scale_inv) for layer in layers])


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class LayerNorm(nn.Module):
    """LayerNorm with bias (the indexer's key norm)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [T] -> cos, sin [T, rope_dim / 2] (one angle per interleaved pair)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved RoPE: pairs (0,1), (2,3), ... rotate together. x [T, ..., R], cos/sin [T, R/2].
    The result comes out de-interleaved (rotated evens, then rotated odds), as in transformers;
    dot products are unchanged, and queries and keys always use the same layout."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


class Indexer(nn.Module):
    """DSA lightning indexer: scores earlier positions and returns the top-k per token."""

    def __init__(self, config: ModelConfig, ops: Ops, fp8: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.ops = ops
        self.n_heads = config.index_n_heads  # the indexer is replicated, not split across ranks
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, ops, fp8, dtype)
        self.wk = Linear(config.hidden_size, self.head_dim, ops, fp8, dtype)
        self.k_norm = LayerNorm(self.head_dim, config.latent_norm_eps, dtype)
        # kept in fp32, as GLM-5-FP8 leaves it unquantized and transformers runs it in fp32
        self.weights_proj = Linear(config.hidden_size, self.n_heads, ops, False, torch.float32)
        # fold both score scales into the head weights: relu(a * s) = s * relu(a) for s > 0
        self.weight_scale = self.n_heads**-0.5 * self.head_dim**-0.5

    def forward(
        self, x: Tensor, q_latent: Tensor, k: Tensor, cos: Tensor, sin: Tensor, batch: StepBatch, index_cache: Tensor,
        index_scale: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """k: self.wk(x) [T, Di] (MLAttention computes it beside its own projections of x)."""
        k = self.k_norm(k)  # [T, Di]
        # the indexer ropes the *first* rope_dim dims of each head (MLA ropes the last ones)
        k = torch.cat([apply_rope(k[..., : self.rope_dim], cos, sin), k[..., self.rope_dim :]], dim=-1)
        self.ops.index_cache_write(k, batch.slot_mapping, index_cache, index_scale)
        operands = (x, q_latent, cos, sin, index_cache, batch.block_tables, batch.seq_ids, batch.positions)
        operands += (index_scale,) if index_scale is not None else ()
        if self.ops.indexer_skips_short and torch.compiler.is_compiling():
            # no token sees more than index_topk keys (the step's positions are all below it): each
            # selects every key it sees, and the queries and scores need not be computed
            return torch.cond(batch.positions.max() >= self.topk, self._scored_topk, self._all_visible, operands)
        return self._scored_topk(*operands)

    def _all_visible(self, x, q_latent, cos, sin, index_cache, block_tables, seq_ids, positions, index_scale=None):
        """-> [T, index_topk] int32: positions 0 .. position of each token, then -1."""
        cols = torch.arange(self.topk, device=positions.device, dtype=torch.int32)
        return torch.where(cols[None, :] <= positions[:, None], cols[None, :], -1)

    def _scored_topk(self, x, q_latent, cos, sin, index_cache, block_tables, seq_ids, positions, index_scale=None):
        """-> [T, index_topk] int32: the indices of the best-scoring keys each token sees."""
        num_tokens = x.shape[0]
        q = self.wq_b(q_latent).view(num_tokens, self.n_heads, self.head_dim)  # [T, Hi, Di]
        q = torch.cat([apply_rope(q[..., : self.rope_dim], cos, sin), q[..., self.rope_dim :]], dim=-1)
        weights = self.weights_proj(x.float()) * self.weight_scale  # [T, Hi]
        return self.ops.indexer_topk(
            q.float(), weights, index_cache, block_tables, seq_ids, positions, self.topk, index_scale
        )  # [T, index_topk]


class MLAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, has_indexer: bool, ops: Ops, fp8: bool, dtype: torch.dtype, sharding: Sharding
    ) -> None:
        super().__init__()
        self.ops = ops
        self.n_heads = sharding.heads(config.num_attention_heads)
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        h = self.n_heads
        self.q_a_proj = Linear(config.hidden_size, config.q_lora_rank, ops, fp8, dtype)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.latent_norm_eps, dtype)
        self.q_b_proj = Linear(config.q_lora_rank, h * config.qk_head_dim, ops, fp8, dtype)
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, config.kv_cache_dim, ops, fp8, dtype)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.latent_norm_eps, dtype)
        # absorbed into queries and outputs, so always held dequantized: [H * (nope + v), kv_lora]
        self.kv_b_proj = Linear(config.kv_lora_rank, h * (self.nope_dim + self.v_dim), ops, False, dtype, viewed=True)
        self.o_proj = Linear(h * self.v_dim, config.hidden_size, ops, fp8, dtype)
        self.indexer = Indexer(config, ops, fp8, dtype) if has_indexer else None
        # the absorbed per-head weights in the layout ops.linear runs fastest (pack_absorbed, at load),
        # else None: forward takes them as views of kv_b_proj's weight
        self.register_parameter("w_uk_t", None)  # [H, kv_lora, nope], in that layout
        self.register_parameter("w_uv", None)  # [H, v, kv_lora], in that layout

    def absorbed(self) -> tuple[Tensor, Tensor]:
        """(W_uk^T [H, kv_lora, nope], W_uv [H, v, kv_lora]): kv_b_proj split per head."""
        if self.w_uk_t is not None:
            return self.w_uk_t, self.w_uv
        w_kv_b = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv_b.split([self.nope_dim, self.v_dim], dim=1)  # [H, nope, L], [H, v, L]
        return w_uk.transpose(1, 2), w_uv

    def pack_absorbed(self, pack) -> None:
        """Hold the absorbed weights as `pack` lays them out (Ops.pack_linear) where it changes them:
        copies, so kv_b_proj's weight, as loaded, adds its size again (GLM-5: 0.2% of the weights)."""
        w_uk_t, w_uv = (w.contiguous() for w in self.absorbed())
        packed_uk_t, packed_uv = pack(w_uk_t), pack(w_uv)
        if packed_uk_t is not w_uk_t and packed_uv is not w_uv:
            self.w_uk_t = nn.Parameter(packed_uk_t, requires_grad=False)
            self.w_uv = nn.Parameter(packed_uv, requires_grad=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, batch: StepBatch, cache: KVCache, layer: int, topk: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        num_tokens, h = x.shape[0], self.n_heads
        # the projections of x: queries' and keys' latents (and the indexer's keys), side by side
        projections = (self.q_a_proj, self.kv_a_proj_with_mqa) + ((self.indexer.wk,) if self.indexer is not None else ())
        q_a, kv_a, *index_k = linears(x, *projections)
        q_latent = self.q_a_layernorm(q_a)  # [T, q_lora]
        q = self.q_b_proj(q_latent).view(num_tokens, h, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)  # [T, H, nope], [T, H, rope]
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, kv_lora]
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        KVCache.write(cache.latent[layer], batch.slot_mapping, torch.cat([latent, k_rope], dim=-1))

        if self.indexer is not None:
            topk = self.indexer(x, q_latent, index_k[0], cos, sin, batch, cache.index_k[layer], cache.index_scale[layer])
        elif topk is None:
            raise ValueError(f"layer {layer} shares its indexer but no earlier layer produced top-k indices")

        # absorb kv_b_proj: q_nope . (W_uk c) = (W_uk^T q_nope) . c, and out = W_uv (sum p c)
        w_uk_t, w_uv = self.absorbed()
        q_latent_abs = self.ops.linear(q_nope, w_uk_t)  # [T, H, kv_lora]
        q_abs = torch.cat([q_latent_abs, q_rope], dim=-1)  # [T, H, kv_lora + rope]
        out_latent = self.ops.sparse_mla(
            q_abs, cache.latent[layer], topk, batch.block_tables, batch.seq_ids, self.softmax_scale, self.kv_lora_rank
        )  # [T, H, kv_lora]
        out = self.ops.linear(out_latent, w_uv)  # [T, H, v]
        return self.o_proj(out.reshape(num_tokens, h * self.v_dim)), topk


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int, ops: Ops, fp8: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, ops, fp8, dtype)
        self.up_proj = Linear(dim, hidden, ops, fp8, dtype)
        self.down_proj = Linear(hidden, dim, ops, fp8, dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)


class Experts(nn.Module):
    """This rank's routed experts, stacked: [n_local, out, in] (+ FP8 block scales per expert)."""

    def __init__(self, config: ModelConfig, ops: Ops, fp8: bool, dtype: torch.dtype, sharding: Sharding) -> None:
        super().__init__()
        self.first_expert, n = sharding.experts(config.n_routed_experts)
        d, i = config.hidden_size, config.moe_intermediate_size
        wdtype = torch.float8_e4m3fn if fp8 else dtype

        def stack(out_dim: int, in_dim: int) -> tuple[nn.Parameter, nn.Parameter | None]:
            w = nn.Parameter(torch.empty(n, out_dim, in_dim, dtype=wdtype), requires_grad=False)
            s = nn.Parameter(torch.empty(n, -(-out_dim // 128), -(-in_dim // 128)), requires_grad=False)
            return w, (s if fp8 else None)

        self.gate_proj, self.gate_proj_scale_inv = stack(i, d)
        self.up_proj, self.up_proj_scale_inv = stack(i, d)
        self.down_proj, self.down_proj_scale_inv = stack(d, i)

    @property
    def scales(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.gate_proj_scale_inv, self.up_proj_scale_inv, self.down_proj_scale_inv


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, fp8: bool, dtype: torch.dtype, sharding: Sharding) -> None:
        super().__init__()
        self.ops = ops
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config, ops, fp8, dtype, sharding)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, ops, fp8, dtype)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        weights, ids = self.ops.route(
            x, self.gate.weight, self.gate.e_score_correction_bias, c.num_experts_per_tok,
            c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor,
        )  # [T, k] fp32, [T, k]
        e, s = self.experts, self.shared_experts
        args = (x, ids, weights, e.gate_proj, e.up_proj, e.down_proj, e.scales, e.first_expert, self.ops.linear)
        if s is not None and self.ops.experts_shared is not None:  # both in one call
            layers = (s.gate_proj, s.up_proj, s.down_proj)
            return self.ops.experts_shared(*args, tuple(m.weight for m in layers),
                                           tuple(m.weight_scale_inv for m in layers))  # fmt: skip
        out = self.ops.experts(*args)  # [T, D]
        if s is not None:
            out = out + s(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, ops: Ops, fp8: bool, dtype: torch.dtype, sharding: Sharding
    ) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = MLAttention(config, config.layer_has_indexer(layer), ops, fp8, dtype, sharding)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = (
            MoE(config, ops, fp8, dtype, sharding)
            if config.layer_is_moe(layer)
            else MLP(config.hidden_size, config.intermediate_size, ops, fp8, dtype)
        )

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, batch: StepBatch, cache: KVCache, topk: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        attn, topk = self.self_attn(self.input_layernorm(x), cos, sin, batch, cache, self.layer, topk)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), topk


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig, own_head: bool, ops: Ops, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.head = Linear(config.hidden_size, config.vocab_size, ops, False, dtype) if own_head else None


class MTPLayer(DecoderLayer):
    """Multi-token prediction (checkpoint layer index num_hidden_layers): predicts the token after
    `next_token` from the main model's hidden state at the current one. Reused for every draft step."""

    def __init__(
        self, config: ModelConfig, layer: int, ops: Ops, fp8: bool, dtype: torch.dtype, sharding: Sharding,
        own_embed: bool, own_head: bool,
    ) -> None:
        super().__init__(config, layer, ops, fp8, dtype, sharding)
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.eh_proj = Linear(2 * d, d, ops, fp8, dtype)
        self.shared_head = SharedHead(config, own_head, ops, dtype)
        self.embed_tokens = Embedding(config.vocab_size, d, dtype) if own_embed else None


class GLM5(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ops: Ops = REFERENCE,
        dtype: torch.dtype = torch.bfloat16,
        fp8: bool = False,
        sharding: Sharding = Sharding(),
        mtp: bool = True,
        mtp_own_embed: bool = False,
        mtp_own_head: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        d = config.hidden_size
        self.embed_tokens = Embedding(config.vocab_size, d, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, ops, fp8, dtype, sharding) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.lm_head = Linear(d, config.vocab_size, ops, False, dtype)
        self.mtp = (
            MTPLayer(config, config.num_hidden_layers, ops, fp8, dtype, sharding, mtp_own_embed, mtp_own_head)
            if mtp and config.num_nextn_predict_layers > 0
            else None
        )
        half, positions = config.qk_rope_head_dim // 2, config.max_position_embeddings
        self.register_buffer("inv_freq", torch.empty(half), persistent=False)
        # every position's RoPE cos and sin, so a step looks its positions up: computed in the step,
        # a compiled graph recomputed them (sin and cos per vector) in each of its ~20 loops that
        # rotate a query or key, per head, on a CPU ~60 us of a 16-token mini step
        self.register_buffer("rope_cos", torch.empty(positions, half, dtype=dtype), persistent=False)
        self.register_buffer("rope_sin", torch.empty(positions, half, dtype=dtype), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE frequencies and tables, on the device they are on (e.g. after
        materialising a model built on the meta device)."""
        r = self.config.qk_rope_head_dim
        freqs = self.config.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float32, device="cpu") / r)
        device = self.inv_freq.device
        self.inv_freq = freqs.to(device)
        if device.type != "meta":
            positions = torch.arange(self.config.max_position_embeddings, device=device)
            self.rope_cos, self.rope_sin = rope_cos_sin(positions, self.inv_freq, self.dtype)

    def forward(self, batch: StepBatch, cache: KVCache) -> Tensor:
        """-> final-normed hidden states [T, D] of every token in the step."""
        x = self.embed_tokens(batch.token_ids)  # [T, D]
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]  # [T, rope_dim / 2]
        topk = None
        for layer in self.layers:
            x, topk = layer(x, cos, sin, batch, cache, topk)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, D] -> logits [N, vocab] in fp32. (Run eagerly, after each step's graph: the
        head's forward is called directly, not through nn.Module.__call__, which cost ~40 us of a
        16-request step on the 2-core dev machine, its caches cold after the graph.)"""
        return self.lm_head.forward(hidden).float()

    def mtp_forward(self, batch: StepBatch, cache: KVCache, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """One MTP draft step. batch.token_ids are the next tokens, `hidden` [T, D] the hidden states
        (from the main model, or from the previous draft step) at the positions before them.
        -> (logits [N, vocab] fp32 at batch.logits_indices, MTP hidden states [T, D] for the next draft step)."""
        x = self.mtp_hidden(batch, cache, hidden)
        return self.mtp_logits(x[batch.logits_indices]), x

    def mtp_hidden(self, batch: StepBatch, cache: KVCache, hidden: Tensor) -> Tensor:
        """The MTP layer over one step (the part a compiled graph holds) -> its hidden states [T, D]."""
        if self.mtp is None:
            raise RuntimeError("this model has no MTP layer")
        m = self.mtp
        embed = m.embed_tokens if m.embed_tokens is not None else self.embed_tokens
        e = m.enorm(embed(batch.token_ids))
        x = m.eh_proj(torch.cat([e, m.hnorm(hidden)], dim=-1))  # [T, 2D] -> [T, D]
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]
        x, _ = m(x, cos, sin, batch, cache, None)
        return x

    def mtp_logits(self, x: Tensor) -> Tensor:
        """MTP hidden states [N, D] -> draft logits [N, vocab] in fp32."""
        m = self.mtp
        head = m.shared_head.head if m.shared_head.head is not None else self.lm_head
        return head.forward(m.shared_head.norm(x)).float()  # (forward: as in logits)
