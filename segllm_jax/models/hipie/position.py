"""Sine positional encodings (architecture.md §O13): the image variant of the encoder, the box variant of the decoder.

Both interleave sin/cos per frequency with ``dim_t[k] = T ** (2 * (k // 2) / F)`` (F = 128 features
per coordinate, T = 10000): channel 2m = sin(e / dim_t[2m]), channel 2m+1 = cos(e / dim_t[2m+1]).

* :func:`sine_position_embedding` (Deformable-DETR ``PositionEmbeddingSine(128, normalize=True)``,
  §H4): e = (cumsum(valid) - 0.5) / (last cumsum + 1e-6) * 2*pi along y and along x, so the
  padding-aware version spans the valid region only. Channels are ``[y-block ; x-block]``.
* :func:`sine_box_embedding` (DINO ``gen_sineembed_for_position``, §H4, §H9): raw coordinates
  times 2*pi (no shift, no normalisation); channels ``[y, x]`` for points, ``[y, x, w, h]`` for boxes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _dim_t(num_pos_feats: int, temperature: float) -> jax.Array:  # [F]
    k = jnp.arange(num_pos_feats, dtype=jnp.float32)
    return jnp.power(jnp.float32(temperature), 2.0 * jnp.floor(k / 2.0) / num_pos_feats)


def _interleave(e: jax.Array, dim_t: jax.Array) -> jax.Array:  # e [...] -> [..., F]
    p = e[..., None] / dim_t
    # stack (sin of even channels, cos of odd channels) on a new last axis, then flatten: s0 c1 s2 c3 ...
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(p.shape)


def sine_position_embedding(mask: jax.Array, num_pos_feats: int = 128, temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> jax.Array:
    """``mask`` [B, H, W] bool (True = padding) -> [B, H, W, 2F] positional map (NHWC)."""
    not_mask = jnp.logical_not(mask).astype(jnp.float32)
    y_embed = jnp.cumsum(not_mask, axis=1)  # [B, H, W]
    x_embed = jnp.cumsum(not_mask, axis=2)
    eps = 1e-6
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = _dim_t(num_pos_feats, temperature)
    return jnp.concatenate([_interleave(y_embed, dim_t), _interleave(x_embed, dim_t)], axis=-1)


def sine_box_embedding(coords: jax.Array, num_pos_feats: int = 128, temperature: float = 10000.0,
                       scale: float = 2 * math.pi) -> jax.Array:
    """``coords`` [..., 2] (x, y) or [..., 4] (cx, cy, w, h) -> [..., 2F] or [..., 4F]; order y, x[, w, h]."""
    dim_t = _dim_t(num_pos_feats, temperature)
    c = coords.astype(jnp.float32) * scale
    parts = [c[..., 1], c[..., 0]]
    if coords.shape[-1] == 4:
        parts += [c[..., 2], c[..., 3]]
    elif coords.shape[-1] != 2:
        raise ValueError(f"coords must end in 2 or 4 values, got shape {coords.shape}")
    return jnp.concatenate([_interleave(e, dim_t) for e in parts], axis=-1)
