"""Encoder side of the deformable transformer: input projections, level bookkeeping, 6 layers.

* :class:`InputProjection` — ``input_proj[i]``: conv (1x1 for the three backbone levels, 3x3/2
  pad 1 for the extra level built from the *raw* res5 map, §O15) + GroupNorm(32) (architecture.md §H5).
  Paths ``conv/{kernel,bias}``, ``norm/{weight,bias}``.
* :func:`level_masks`, :func:`valid_ratios`, :func:`flatten_levels`, :func:`encoder_reference_points`
  — the Deformable-DETR bookkeeping (padding masks by nearest resizing, valid ratios, row-major
  flattening of NHWC maps, token-centre reference points; §H5, §H7).
* :class:`DeformableEncoderLayer` — post-norm: x = LN1(x + MSDeformAttn(x + pos, ref, x));
  x = LN2(x + W2 ReLU(W1 x)), the norms and FFN over blocks of tokens (``token_blocks``: the hidden
  ``[B, S, ffn_dim]`` exists one block at a time).
  Paths ``self_attn/*``, ``norm1``, ``linear1``, ``linear2``, ``norm2``.
* :class:`DeformableEncoder` — ``layers/{0..5}``. The VL fusion (before layer 0) lives in
  ``fusion.py`` and is applied by the caller (``image_side.HipieImageSide.encode_prompt``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.conv import Conv2d, GroupNorm
from segllm_jax.models.hipie.deformable_attention import MSDeformAttn
from segllm_jax.models.hipie.token_blocks import map_token_blocks, token_block_size
from segllm_jax.models.layers import LayerNorm, Linear

SpatialShapes = tuple[tuple[int, int], ...]


class InputProjection(nnx.Module):
    """Conv (+bias) -> GroupNorm, NHWC: ``input_proj.<i>.0`` / ``input_proj.<i>.1``."""

    def __init__(self, in_channels: int, cfg: HipieConfig, *, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.conv = Conv2d(in_channels, cfg.d_model, kernel_size, stride=stride, padding=padding, **kw)
        self.norm = GroupNorm(cfg.group_norm_groups, cfg.d_model, eps=cfg.group_norm_eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # [I, H, W, Cin] -> [I, H', W', C]
        return self.norm(self.conv(x))


def input_projections(cfg: HipieConfig, *, rngs: nnx.Rngs) -> nnx.List:
    """The four projections: 1x1 for res3/res4/res5, 3x3 stride 2 pad 1 on raw res5 (§O15)."""
    res3, res4, res5 = cfg.backbone_out_channels
    return nnx.List([
        InputProjection(res3, cfg, rngs=rngs),
        InputProjection(res4, cfg, rngs=rngs),
        InputProjection(res5, cfg, rngs=rngs),
        InputProjection(res5, cfg, kernel_size=3, stride=2, padding=1, rngs=rngs),
    ])


def nearest_resize_mask(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(mask.float(), size, mode="nearest").bool()``: source index floor(dst * in/out)."""
    h_in, w_in = mask.shape[-2:]
    h, w = size
    rows = np.minimum(np.floor(np.arange(h, dtype=np.float32) * np.float32(h_in / h)).astype(np.int64), h_in - 1)
    cols = np.minimum(np.floor(np.arange(w, dtype=np.float32) * np.float32(w_in / w)).astype(np.int64), w_in - 1)
    return mask[..., rows, :][..., :, cols]


def level_masks(pixel_mask: jax.Array, spatial_shapes: SpatialShapes) -> list[jax.Array]:
    """Padding masks per level (True = padding): levels 0-2 from the image mask, the extra level
    from level 0's mask, both by nearest resizing (as the original)."""
    masks = [nearest_resize_mask(pixel_mask, hw) for hw in spatial_shapes[:3]]
    masks += [nearest_resize_mask(masks[0], hw) for hw in spatial_shapes[3:]]
    return masks


def valid_ratios(masks: Sequence[jax.Array]) -> jax.Array:  # -> [B, L, 2] as (w, h)
    """Fraction of valid rows/columns per level (``get_valid_ratio``); all ones without padding."""
    out = []
    for m in masks:
        _, h, w = m.shape
        valid_h = jnp.sum(~m[:, :, 0], axis=1).astype(jnp.float32) / h
        valid_w = jnp.sum(~m[:, 0, :], axis=1).astype(jnp.float32) / w
        out.append(jnp.stack([valid_w, valid_h], -1))
    return jnp.stack(out, 1)


def flatten_levels(maps: Sequence[jax.Array]) -> jax.Array:
    """[B, H_l, W_l, C] per level -> [B, sum H_l W_l, C]; row-major, the same order as PyTorch's
    ``flatten(2).transpose(1, 2)`` of NCHW maps."""
    return jnp.concatenate([m.reshape(m.shape[0], -1, *m.shape[3:]) for m in maps], axis=1)


def level_start_index(spatial_shapes: SpatialShapes) -> tuple[int, ...]:
    return tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1])


def encoder_reference_points(spatial_shapes: SpatialShapes, ratios: jax.Array) -> jax.Array:
    """Token centres, normalised by the valid extent, replicated per target level: [B, S, L, 2] (x, y)."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5,
                             indexing="ij")
        ref_y = jnp.asarray(ys.reshape(-1))[None] / (ratios[:, None, lvl, 1] * h)  # [B, HW]
        ref_x = jnp.asarray(xs.reshape(-1))[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(jnp.stack([ref_x, ref_y], -1))
    ref = jnp.concatenate(refs, axis=1)  # [B, S, 2]
    return ref[:, :, None, :] * ratios[:, None, :, :]  # [B, S, L, 2]


class DeformableEncoderLayer(nnx.Module):
    """Post-norm deformable self-attention + ReLU FFN (dropout 0 in SegLLM)."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.self_attn = MSDeformAttn(cfg.d_model, cfg.num_heads, cfg.num_feature_levels, cfg.enc_points,
                                      impl=cfg.msda_impl, **kw)
        self.norm1 = LayerNorm(cfg.d_model, axis_name="hipie_embed", eps=cfg.layer_norm_eps, **kw)
        self.linear1 = Linear(cfg.d_model, cfg.ffn_dim, axes=("hipie_embed", "hipie_mlp"), **kw)
        self.linear2 = Linear(cfg.ffn_dim, cfg.d_model, axes=("hipie_mlp", "hipie_embed"), **kw)
        self.norm2 = LayerNorm(cfg.d_model, axis_name="hipie_embed", eps=cfg.layer_norm_eps, **kw)
        self.block_bytes = cfg.token_block_bytes

    def __call__(self, x: jax.Array, pos: jax.Array, reference_points: jax.Array, spatial_shapes: SpatialShapes,
                 start_index: Sequence[int], padding_mask: jax.Array | None) -> jax.Array:  # [B, S, C]
        attn = self.self_attn(x + pos, reference_points, x, spatial_shapes, start_index, padding_mask)
        block = token_block_size(x.shape[1], x.shape[0], self.linear1.kernel.shape[1], self.block_bytes)
        return map_token_blocks(self._norm_ffn, (x, attn), block)

    def _norm_ffn(self, xs: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Per token: LN1(x + attn), then LN2(. + FFN(.)); run over token blocks (its hidden is [B, S, ffn_dim])."""
        x, attn = xs
        x = self.norm1(x + attn)
        return self.norm2(x + self.linear2(jax.nn.relu(self.linear1(x))))


class DeformableEncoder(nnx.Module):
    """``layers/{i}``; returns the final memory and, on request, every layer's output."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([DeformableEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.enc_layers)])

    def __call__(self, x: jax.Array, pos: jax.Array, spatial_shapes: SpatialShapes, ratios: jax.Array,
                 padding_mask: jax.Array | None = None, *, return_all: bool = False
                 ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        ref = encoder_reference_points(spatial_shapes, ratios)  # [B, S, L, 2]
        starts = level_start_index(spatial_shapes)
        outs = []
        for layer in self.layers:
            x = layer(x, pos, ref, spatial_shapes, starts, padding_mask)
            outs.append(x)
        return (x, tuple(outs)) if return_all else x
