"""Two-stage query selection (architecture.md §H8): encoder tokens -> scored proposals -> decoder queries.

Steps, per prompt:

1. every encoder token gets a fixed proposal box (its cell centre, w = h = 0.05 * 2**level),
   stored as logits; boxes outside (0.01, 0.99) and padded tokens are *invalid*: +inf logits and
   zeroed memory (§O5);
2. ``enc_output`` + ``enc_output_norm`` on that memory; ``class_embed[6]`` (language-free) scores
   each token, ``bbox_embed[6]`` regresses a delta added to the proposal logits;
3. top-k (k = ``num_queries``) by score, **descending**: rank r pairs with ``tgt_embed[r]``
   (mixed selection: learned content, proposal position; §O4);
4. the ``num_bg_queries`` background queries (``tgt_embed_bg`` + raw ``bg_query_refs`` boxes,
   no sigmoid; §O3) go in front.

Tie order (§O4): ``jax.lax.top_k`` returns equal scores lowest index first; PyTorch's CPU topk
leaves it unspecified. Genuinely tied or near-tied scores (README: ranks 31/32 of
``seed0_256`` prompt 1 differ by 1.8e-7) may therefore swap; tests force the golden order via
``topk_indices``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.layers import Embed, LayerNorm, Linear

SpatialShapes = tuple[tuple[int, int], ...]


class Queries(NamedTuple):
    """What the two-stage selection hands to the decoder (and what the golden files record)."""

    tgt: jax.Array  # [B, Qbg + K, C] content: bg embeddings, then tgt_embed rows 0..K-1
    init_reference: jax.Array  # [B, Qbg + K, 4] cxcywh: raw bg boxes, then sigmoid(top-k box logits)
    enc_scores: jax.Array  # [B, S] proposal logit of every token
    enc_coord_unact: jax.Array  # [B, S, 4] box logits (+inf for invalid tokens)
    topk_indices: jax.Array  # [B, K] int32 token indices, descending score
    topk_scores: jax.Array  # [B, K]
    output_memory: jax.Array  # [B, S, C] enc_output_norm(enc_output(masked memory)) (training: enc loss)


def gen_encoder_output_proposals(memory: jax.Array, spatial_shapes: SpatialShapes,
                                 padding_mask: jax.Array | None = None, *, base_size: float = 0.05,
                                 valid_min: float = 0.01, valid_max: float = 0.99
                                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(masked memory [B,S,C], proposal logits [B,S,4], valid [B,S]) as in HIPIE's two-stage code.

    Centres are ``(index + 0.5) / valid_size`` per level, in float32 like the original's
    ``linspace`` grid; sizes are ``float32(0.05) * 2**level``. Invalid or padded tokens get
    ``+inf`` logits (not NaN: ``sigmoid(+inf) = 1`` must survive, §O5) and zero memory.
    """
    b, s, _ = memory.shape
    if padding_mask is None:
        padding_mask = jnp.zeros((b, s), jnp.bool_)
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        pad = padding_mask[:, start:start + h * w].reshape(b, h, w)
        valid_h = jnp.sum(~pad[:, :, 0], axis=1).astype(jnp.float32)  # [B]
        valid_w = jnp.sum(~pad[:, 0, :], axis=1).astype(jnp.float32)  # [B]
        gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
        cx = (gx[None] + 0.5) / valid_w[:, None, None]  # [B, H, W]
        cy = (gy[None] + 0.5) / valid_h[:, None, None]
        wh = jnp.full((b, h, w), jnp.float32(base_size) * jnp.float32(2.0 ** lvl), jnp.float32)
        proposals.append(jnp.stack([cx, cy, wh, wh], -1).reshape(b, h * w, 4))
        start += h * w
    props = jnp.concatenate(proposals, axis=1)  # [B, S, 4]
    valid = jnp.all((props > valid_min) & (props < valid_max), axis=-1)  # [B, S]
    logits = jnp.log(props / (1.0 - props))
    invalid = padding_mask | ~valid
    logits = jnp.where(invalid[..., None], jnp.inf, logits)
    masked = jnp.where(invalid[..., None], jnp.zeros((), memory.dtype), memory)
    return masked, logits, ~invalid


class TwoStageSelect(nnx.Module):
    """Proposal scoring, top-k and query assembly; owns ``enc_output(_norm)``, ``tgt_embed(_bg)``, ``bg_query_refs``.

    The scoring heads (``class_embed[6]``, ``bbox_embed[6]``) live on ``Hipie`` and are passed in (§O12).
    """

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        c = cfg.d_model
        self.cfg = cfg
        self.enc_output = Linear(c, c, axes=("hipie_embed", "hipie_embed"), **kw)
        self.enc_output_norm = LayerNorm(c, axis_name="hipie_embed", eps=cfg.layer_norm_eps, **kw)
        self.tgt_embed = Embed(cfg.num_queries, c, axes=(None, "hipie_embed"), **kw)
        self.tgt_embed_bg = Embed(cfg.num_bg_queries, c, axes=(None, "hipie_embed"), **kw)
        self.bg_query_refs = Embed(cfg.num_bg_queries, 4, axes=(None, None), **kw)

    def __call__(self, memory: jax.Array, spatial_shapes: SpatialShapes, score_head: nnx.Module,
                 box_head: nnx.Module, padding_mask: jax.Array | None = None,
                 topk_indices: jax.Array | None = None) -> Queries:
        """``memory`` [B,S,C] -> :class:`Queries`. ``topk_indices`` [B,K] overrides the selection (test hook)."""
        cfg = self.cfg
        b = memory.shape[0]
        masked, prop_logits, _ = gen_encoder_output_proposals(
            memory, spatial_shapes, padding_mask, base_size=cfg.proposal_base_size,
            valid_min=cfg.proposal_valid_min, valid_max=cfg.proposal_valid_max)
        out_mem = self.enc_output_norm(self.enc_output(masked))  # [B, S, C]
        enc_scores = score_head(out_mem)[..., 0].astype(jnp.float32)  # [B, S]
        enc_coord_unact = box_head(out_mem).astype(jnp.float32) + prop_logits  # [B, S, 4]
        if topk_indices is None:
            topk_scores, topk_indices = jax.lax.top_k(enc_scores, cfg.num_queries)  # descending, stable
        else:
            topk_indices = jnp.asarray(topk_indices, jnp.int32)
            topk_scores = jnp.take_along_axis(enc_scores, topk_indices, axis=1)
        topk_indices = topk_indices.astype(jnp.int32)
        coords = jnp.take_along_axis(enc_coord_unact, topk_indices[..., None], axis=1)  # [B, K, 4]
        ref_fg = jax.nn.sigmoid(coords)  # +inf -> exactly 1.0
        ref_bg = jnp.broadcast_to(self.bg_query_refs.embedding[...].astype(jnp.float32)[None],
                                  (b, cfg.num_bg_queries, 4))  # used raw (§O3)
        tgt = jnp.concatenate([self.tgt_embed_bg.embedding[...], self.tgt_embed.embedding[...]], axis=0)
        tgt = jnp.broadcast_to(tgt[None].astype(jnp.float32), (b,) + tgt.shape)  # [B, Qbg+K, C]
        return Queries(tgt=tgt, init_reference=jnp.concatenate([ref_bg, ref_fg], axis=1),
                       enc_scores=enc_scores, enc_coord_unact=enc_coord_unact, topk_indices=topk_indices,
                       topk_scores=topk_scores, output_memory=out_mem)


def level_shapes(spatial_shapes: Sequence[Sequence[int]]) -> SpatialShapes:
    """Static ``((H_l, W_l), ...)`` from any array-like (the golden files store them as int32 arrays)."""
    return tuple((int(h), int(w)) for h, w in spatial_shapes)
