"""HIPIE's deformable decoder (architecture.md §H9) with two-stage query selection in front (§H8).

``HipieDecoder`` owns ``two_stage`` (proposal scoring, top-k, query tables), ``layers`` (6 x
self-attention -> deformable cross-attention -> FFN, post-norm) and ``ref_point_head`` (query
positions from the sine encoding of the current reference box). The per-layer box heads
(``bbox_embed``) and scoring heads live on ``Hipie`` and are passed in (§O12).

Per layer ``lid``: ``query_pos = ref_point_head(sine(ref))``; after the layer,
``new_ref = sigmoid(bbox_embed[lid](tgt) + inverse_sigmoid(ref))``. The next layer starts from
``stop_gradient(new_ref)``; ``inter_references[lid]`` stores the *undetached* ``new_ref``
(look-forward-twice). Background queries (§O3) run through every layer like the others.

Training (later issue): denoising queries are prepended by the caller through ``prefix_tgt`` /
``prefix_reference`` and ``attn_mask`` ([Q, Q] bool, True = blocked) separates the groups.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.deformable_attention import MSDeformAttn
from segllm_jax.models.hipie.heads import MLP, inverse_sigmoid
from segllm_jax.models.hipie.position import sine_box_embedding
from segllm_jax.models.hipie.proposals import Queries, SpatialShapes, TwoStageSelect
from segllm_jax.models.layers import LayerNorm, Linear


class QueryAttention(nnx.Module):
    """``nn.MultiheadAttention`` with q, k, v packed in one ``in_proj`` (kernel ``[C, 3C]``, columns q|k|v).

    Kept packed so that ``in_proj_weight`` / ``in_proj_bias`` convert one-to-one (§A3).
    """

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        c = cfg.d_model
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.in_proj = Linear(c, 3 * c, axes=("hipie_embed", "hipie_heads"), **kw)
        self.out_proj = Linear(c, c, axes=("hipie_heads", "hipie_embed"), **kw)
        self.num_heads = cfg.num_heads
        self.d_model = c

    def __call__(self, qk_in: jax.Array, v_in: jax.Array, attn_mask: jax.Array | None = None) -> jax.Array:
        c, h = self.d_model, self.num_heads
        w = self.in_proj.kernel[...].astype(jnp.float32)  # [C, 3C]
        bias = self.in_proj.bias[...].astype(jnp.float32)
        q = qk_in @ w[:, :c] + bias[:c]
        k = qk_in @ w[:, c:2 * c] + bias[c:2 * c]
        v = v_in @ w[:, 2 * c:] + bias[2 * c:]
        b, n, _ = q.shape
        dh = c // h
        q = q.reshape(b, n, h, dh) * (dh ** -0.5)
        k = k.reshape(b, n, h, dh)
        v = v.reshape(b, n, h, dh)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, Q, Q]
        if attn_mask is not None:
            logits = jnp.where(attn_mask, -jnp.inf, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c)
        return self.out_proj(out)


class DecoderLayer(nnx.Module):
    """Post-norm decoder layer: SA -> norm2, deformable CA -> norm1, FFN -> norm3 (checkpoint names)."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        c = cfg.d_model
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.self_attn = QueryAttention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(c, axis_name="hipie_embed", eps=cfg.layer_norm_eps, **kw)
        self.cross_attn = MSDeformAttn(c, cfg.num_heads, cfg.num_feature_levels, cfg.dec_points,
                                       impl=cfg.msda_impl, **kw)
        self.norm1 = LayerNorm(c, axis_name="hipie_embed", eps=cfg.layer_norm_eps, **kw)
        self.linear1 = Linear(c, cfg.ffn_dim, axes=("hipie_embed", "hipie_mlp"), **kw)
        self.linear2 = Linear(cfg.ffn_dim, c, axes=("hipie_mlp", "hipie_embed"), **kw)
        self.norm3 = LayerNorm(c, axis_name="hipie_embed", eps=cfg.layer_norm_eps, **kw)

    def __call__(self, tgt: jax.Array, query_pos: jax.Array, reference: jax.Array, memory: jax.Array,
                 spatial_shapes: SpatialShapes, level_start_index: Sequence[int],
                 padding_mask: jax.Array | None, attn_mask: jax.Array | None) -> jax.Array:
        """``reference`` [B, Q, L, 4]: the current boxes per level (already scaled by valid ratios)."""
        qk = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(qk, tgt, attn_mask))
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, reference, memory, spatial_shapes,
                                               level_start_index, padding_mask))
        tgt = self.norm3(tgt + self.linear2(jax.nn.relu(self.linear1(tgt))))
        return tgt


class DecoderOutput(NamedTuple):
    hs: jax.Array  # [n_layers, B, Q, C]
    inter_references: jax.Array  # [n_layers, B, Q, 4]
    init_reference: jax.Array  # [B, Q, 4]
    queries: Queries


class HipieDecoder(nnx.Module):
    """Two-stage selection + ``dec_layers`` decoder layers with iterative box refinement."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        c = cfg.d_model
        self.cfg = cfg
        self.two_stage = TwoStageSelect(cfg, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.dec_layers)])
        self.ref_point_head = MLP(2 * c, c, c, 2, rngs=rngs, out_axis="hipie_embed",
                                  param_dtype=cfg.param_dtype, dtype=cfg.dtype)

    def run_layers(self, tgt: jax.Array, reference: jax.Array, memory: jax.Array, spatial_shapes: SpatialShapes,
                   level_start_index: Sequence[int], bbox_embed: Sequence[nnx.Module],
                   padding_mask: jax.Array | None = None, attn_mask: jax.Array | None = None,
                   valid_ratios: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The decoder proper: (hs [L,B,Q,C], inter_references [L,B,Q,4]) from queries and reference boxes."""
        hs, refs = [], []
        n_levels = len(spatial_shapes)
        for lid, layer in enumerate(self.layers):
            if valid_ratios is None:  # SegLLM: no padding mask, every ratio is 1
                ref_in = jnp.broadcast_to(reference[:, :, None, :], reference.shape[:2] + (n_levels, 4))
            else:  # boxes scaled per level by the valid (w, h) fraction of the map
                ref_in = reference[:, :, None, :] * jnp.concatenate([valid_ratios, valid_ratios], -1)[:, None]
            # ref_in: [B, Q, L, 4]; query position = MLP(sine of the level-0 box in [y, x, w, h] order, §O13)
            query_pos = self.ref_point_head(sine_box_embedding(ref_in[:, :, 0], self.cfg.d_model // 2,
                                                               self.cfg.pos_temperature))  # [B, Q, C]
            tgt = layer(tgt, query_pos, ref_in, memory, spatial_shapes, level_start_index,
                        padding_mask, attn_mask)
            new_ref = jax.nn.sigmoid(bbox_embed[lid](tgt).astype(jnp.float32) + inverse_sigmoid(reference))
            hs.append(tgt)
            refs.append(new_ref)  # look-forward-twice: the undetached refinement
            reference = jax.lax.stop_gradient(new_ref)
        return jnp.stack(hs), jnp.stack(refs)

    def __call__(self, memory: jax.Array, spatial_shapes: SpatialShapes, level_start_index: Sequence[int],
                 class_embed: Sequence[nnx.Module], bbox_embed: Sequence[nnx.Module],
                 padding_mask: jax.Array | None = None, *, topk_indices: jax.Array | None = None,
                 prefix_tgt: jax.Array | None = None, prefix_reference: jax.Array | None = None,
                 attn_mask: jax.Array | None = None, valid_ratios: jax.Array | None = None) -> DecoderOutput:
        """memory [B,S,C] -> :class:`DecoderOutput`. ``topk_indices`` forces the proposal order (tests)."""
        n = self.cfg.dec_layers
        queries = self.two_stage(memory, spatial_shapes, class_embed[n], bbox_embed[n], padding_mask,
                                 topk_indices=topk_indices)
        tgt, reference = queries.tgt, queries.init_reference
        if prefix_tgt is not None:  # DN queries (training): in front of bg + fg
            tgt = jnp.concatenate([prefix_tgt.astype(tgt.dtype), tgt], axis=1)
            reference = jnp.concatenate([prefix_reference.astype(reference.dtype), reference], axis=1)
        hs, inter = self.run_layers(tgt, reference, memory, spatial_shapes, level_start_index, bbox_embed,
                                    padding_mask, attn_mask, valid_ratios)
        return DecoderOutput(hs=hs, inter_references=inter, init_reference=reference, queries=queries)
