"""Multi-scale deformable attention module (Deformable-DETR ``MSDeformAttn``; architecture.md §H15).

The module owns the four projections and turns (query, reference points) into normalised
sampling locations and softmaxed attention weights; the bilinear gather itself is
``pallas_kernels.ms_deform_attn`` (pure JAX on CPU, Pallas on GPU/TPU).

Used twice in HIPIE:

* encoder self-attention (``encoder.layers.i.self_attn``): 2-d reference points (token centres),
  offsets are in level pixels and divided by (W_l, H_l) of their level (§H15);
* decoder cross-attention (``decoder.layers.i.cross_attn``): 4-d reference boxes (cx, cy, w, h),
  offsets are scaled by ``wh / n_points / 2`` (no per-level normaliser).

Parameter layout (NNX paths, one-to-one with the PyTorch keys):
``value_proj/{kernel,bias}``, ``sampling_offsets/{kernel,bias}``, ``attention_weights/{kernel,bias}``,
``output_proj/{kernel,bias}``; kernels are ``[in, out]``.
Flat output index of ``sampling_offsets`` is ``((m*L + l)*P + p)*2 + xy`` and of
``attention_weights`` ``(m*L + l)*P + p`` (§H15), so plain reshapes recover the axes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import ms_deform_attn
from pallas_kernels.ms_deform_attn.xla import zero_after
from segllm_jax.models.layers import Linear

SpatialShapes = tuple[tuple[int, int], ...]


def _xavier_uniform(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    fan_in, fan_out = shape[0], shape[-1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


def _offset_grid_bias(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
    """Deformable-DETR's initial offsets: head m points along direction 2*pi*m/M, point p at radius p+1."""
    thetas = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)  # [M, 2]
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))  # [M, L, P, 2]
    grid *= np.arange(1, n_points + 1, dtype=np.float64)[None, None, :, None]
    return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nnx.Module):
    """Multi-scale deformable attention over a flattened multi-level feature map.

    ``__call__(query [B,Q,C], reference_points [B,Q,L,2|4], value_input [B,S,C], spatial_shapes,
    level_start_index, padding_mask [B,S] | None) -> [B,Q,C]``.

    ``padding_mask`` follows HIPIE's convention: True marks a *padding* token, whose value row is
    zeroed before sampling (the Hugging Face module's ``attention_mask`` is the inverse; §H15).
    ``query`` must already contain the positional embedding.
    """

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, *, rngs: nnx.Rngs,
                 impl: str = "auto", param_dtype: str = "float32", dtype: str = "float32"):
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.n_levels, self.n_points = d_model, n_heads, n_levels, n_points
        self.impl = impl
        self.dtype = dtype
        mlp = n_heads * n_levels * n_points
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.sampling_offsets = Linear(d_model, mlp * 2, axes=("hipie_embed", "hipie_heads"), **kw)
        self.attention_weights = Linear(d_model, mlp, axes=("hipie_embed", "hipie_heads"), **kw)
        self.value_proj = Linear(d_model, d_model, axes=("hipie_embed", "hipie_heads"), **kw)
        self.output_proj = Linear(d_model, d_model, axes=("hipie_heads", "hipie_embed"), **kw)
        # Fresh-training init of the original (_reset_parameters); converted weights overwrite it.
        pd = jnp.dtype(param_dtype)
        self.sampling_offsets.kernel.set_value(jnp.zeros((d_model, mlp * 2), pd))
        self.sampling_offsets.bias.set_value(jnp.asarray(_offset_grid_bias(n_heads, n_levels, n_points), pd))
        self.attention_weights.kernel.set_value(jnp.zeros((d_model, mlp), pd))
        self.attention_weights.bias.set_value(jnp.zeros((mlp,), pd))
        for lin in (self.value_proj, self.output_proj):
            lin.kernel.set_value(_xavier_uniform(rngs.params(), (d_model, d_model), pd))
            lin.bias.set_value(jnp.zeros((d_model,), pd))

    def sampling(self, query: jax.Array, reference_points: jax.Array,
                 spatial_shapes: SpatialShapes) -> tuple[jax.Array, jax.Array]:
        """Sampling locations [B,Q,M,L,P,2] (normalised x, y) and softmaxed weights [B,Q,M,L,P]."""
        b, q, _ = query.shape
        m, nl, p = self.n_heads, self.n_levels, self.n_points
        off = self.sampling_offsets(query).astype(jnp.float32).reshape(b, q, m, nl, p, 2)
        logits = self.attention_weights(query).astype(jnp.float32).reshape(b, q, m, nl * p)
        aw = jax.nn.softmax(logits, axis=-1).reshape(b, q, m, nl, p)  # joint over levels x points
        ref = reference_points.astype(jnp.float32)
        if ref.shape[-1] == 2:
            # offsets are in pixels of their level: normalise by (W_l, H_l) (x first)
            norm = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)  # [L, 2]
            loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        elif ref.shape[-1] == 4:
            # offsets are relative to the box: half its size split over the points
            loc = ref[:, :, None, :, None, :2] + off / p * ref[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got shape {ref.shape}")
        return loc, aw

    def __call__(self, query: jax.Array, reference_points: jax.Array, value_input: jax.Array,
                 spatial_shapes: SpatialShapes, level_start_index: Sequence[int] | jax.Array,
                 padding_mask: jax.Array | None = None) -> jax.Array:
        b, s, _ = value_input.shape
        if sum(h * w for h, w in spatial_shapes) != s:
            raise ValueError(f"value_input has {s} tokens but spatial_shapes {spatial_shapes} sum to "
                             f"{sum(h * w for h, w in spatial_shapes)}")
        # the value projection waits for the query: the decoder's 6 layers share value_input (the encoder
        # memory), and XLA would otherwise run all 6 projections up front ([B, S, C] each, all alive)
        value_input = value_input + zero_after(value_input.dtype, query)
        value = self.value_proj(value_input)  # [B, S, C]
        if padding_mask is not None:
            value = jnp.where(padding_mask[..., None], jnp.zeros((), value.dtype), value)
        value = value.reshape(b, s, self.n_heads, self.d_model // self.n_heads)  # [B, S, M, D]
        loc, aw = self.sampling(query, reference_points, spatial_shapes)
        # locations stay float32 even for bf16 values: they address pixels of up to 128-wide maps
        out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, aw,
                             impl=self.impl)  # [B, Q, M*D]
        return self.output_proj(out)
