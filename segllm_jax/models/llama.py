"""LLaMA decoder (LLaVA-1.5 / Vicuna-v1.5) with a KV cache that grows round by round.

SegLLM feeds the LLM ``inputs_embeds`` (token embeddings with image and reference features
*added*, architecture.md §D7) and reads the final-norm hidden states (the [SEG] prompt is the state just
before each ``<seg>``, §D8) as well as the logits.

The cache is a fixed-capacity ring of key/value slots written in time order. Each call appends
its tokens at slots ``[end, end + T)`` for every row; ``valid`` records which slots hold real
(non-padding) tokens. Because slots are in time order, causality is simply ``slot <= end + t``,
so a prefill followed by any number of appends is exactly one full forward (§D10: later rounds
append to earlier ones). RoPE positions are explicit inputs, so padding never shifts them.

RoPE uses the HF ``rotate_half`` layout: HF checkpoints already store q/k projections permuted
for it, so weights convert without an un-permute (the parity test against transformers decides).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segllm_jax.config import LlamaConfig
from segllm_jax.models.layers import Embed, Linear, RMSNorm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer for the tokens seen so far."""

    k: jax.Array  # [L, B, C, N_kv, H]
    v: jax.Array  # [L, B, C, N_kv, H]
    valid: jax.Array  # [B, C] bool: slot holds a real token
    end: jax.Array  # [] int32: first free slot (same for all rows)

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, capacity: int) -> "KVCache":
        shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, capacity), bool), jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, T, head_dim]`` in float32, HF layout (frequencies repeated for both halves)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B, T, N, H]`` rotated with the rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=False, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        d, n, nkv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, n * h, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, nkv * h, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, nkv * h, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), **kw)
        self.cfg = cfg

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 mask: jax.Array, end: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)  # [B, T, N, H]
        k = apply_rope(self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)  # [B, T, Nkv, H]
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, end, 0, 0))  # [B, C, Nkv, H]
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, end, 0, 0))
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)  # [B, T, Nkv, G, H]
        scores = jnp.einsum("btkgh,bckh->bkgtc", q, k_cache.astype(q.dtype),
                            preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5  # [B, Nkv, G, T, C]
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgtc,bckh->btkgh", probs, v_cache.astype(q.dtype))  # [B, T, Nkv, G, H]
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), k_cache, v_cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=False, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, axis_name="embed", **kw)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, axis_name="embed", **kw)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, k_cache, v_cache, mask, end):
        h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, mask, end)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LlamaOutput:
    hidden: jax.Array  # [B, T, D] after the final RMSNorm
    logits: jax.Array  # [B, T, V] float32
    cache: KVCache
    layer_outputs: tuple[jax.Array, ...] = ()  # residual stream after each layer, if asked for


class Llama(nnx.Module):
    """``LlamaForCausalLM``: embeddings, decoder layers, final norm, LM head."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), rngs=rngs,
                                  param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, axis_name="embed", rngs=rngs, eps=cfg.rms_norm_eps,
                            param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, use_bias=False,
            param_dtype=cfg.param_dtype, dtype=cfg.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, T, D]``; SegLLM adds multimodal features to these."""
        return self.embed_tokens(ids)

    def __call__(self, inputs_embeds: jax.Array, token_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None,
                 return_layer_outputs: bool = False) -> LlamaOutput:
        """Runs ``inputs_embeds [B, T, D]`` on top of ``cache`` (a fresh one of capacity T if None).

        ``token_mask [B, T]`` marks real tokens (False = padding); ``positions [B, T]`` are the RoPE
        positions, by default counted over real tokens only, continuing from the cache.
        """
        b, t, _ = inputs_embeds.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)
        if cache is None:
            cache = KVCache.empty(self.cfg, b, t)
        if positions is None:
            seen = cache.valid.sum(-1, dtype=jnp.int32)[:, None]  # [B, 1]
            positions = seen + jnp.cumsum(token_mask, axis=-1, dtype=jnp.int32) - 1  # [B, T]
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.end))  # [B, C]
        slots = jnp.arange(cache.capacity)
        causal = slots[None, :] <= cache.end + jnp.arange(t)[:, None]  # [T, C]
        mask = causal[None] & valid[:, None, :]  # [B, T, C]
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

        x = inputs_embeds.astype(self.cfg.dtype)
        ks, vs, layer_outputs = [], [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, cache.k[i], cache.v[i], mask, cache.end)
            ks.append(k)
            vs.append(v)
            layer_outputs.append(x)
        hidden = self.norm(x)
        logits = (self.embed_tokens.attend(hidden) if self.lm_head is None
                  else self.lm_head(hidden).astype(jnp.float32))
        new_cache = KVCache(jnp.stack(ks), jnp.stack(vs), valid, cache.end + t)
        return LlamaOutput(hidden, logits.astype(jnp.float32), new_cache,
                           tuple(layer_outputs) if return_layer_outputs else ())
