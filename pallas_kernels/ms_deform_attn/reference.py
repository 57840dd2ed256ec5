"""Pure-JAX multi-scale deformable attention: the building blocks and the dense reference.

``ms_deform_attn_dense`` is the numerical reference for the blocked ``impl="xla"``
path (``xla.py``) and the Pallas kernels.  It follows the idea of scenic's
deformable-DETR attention: instead of one ``grid_sample`` per level (as the PyTorch fallback does), the four bilinear
corners of every sample of every level are turned into flat row indices into
``value`` and a combined weight ``attention_weight * bilinear_weight``; a
single gather then fetches all ``L * P * 4`` rows per query and head and a
weighted sum reduces them.  Out-of-range corners get weight 0 and a clamped
(valid) index, which reproduces ``grid_sample(padding_mode="zeros",
align_corners=False)`` and the CUDA kernel's range test exactly.

Everything here is ordinary differentiable JAX, so ``jax.grad`` gives the
gradients w.r.t. value, sampling locations and attention weights; gradients
through ``floor`` are zero, matching the CUDA op's hand-written backward.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

SpatialShapes = tuple[tuple[int, int], ...]


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype: float32 for bf16/f16/f32 inputs, float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def out_struct(shape: tuple[int, ...], dtype: jnp.dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """Kernel output type that varies over the same ``shard_map`` mesh axes as ``like``.

    Under ``shard_map(check_vma=True)`` a ``pallas_call`` must be told how its
    outputs vary across manual mesh axes; MSDA outputs vary exactly like its
    batch-sharded inputs.
    """
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def level_corners(
    loc_x: jax.Array,  # [...] normalised x in level units
    loc_y: jax.Array,  # [...]
    height: int,
    width: int,
    start: int,
) -> tuple[jax.Array, jax.Array, list[tuple[jax.Array, jax.Array, jax.Array]]]:
    """Bilinear corners of samples on one level (also used inside the Pallas kernels).

    Returns ``(fx, fy, corners)`` where ``corners`` lists ``(index, weight,
    valid)`` for (y0, x0), (y0, x1), (y1, x0), (y1, x1).  ``index`` is an int32 row
    of the flattened ``S`` axis; a corner outside the level has weight 0 and
    index ``start`` so gathers stay in bounds and add nothing.  Non-finite
    locations fail every range test and contribute zero, like the CUDA op.
    """
    # Pixel centres sit at integer coordinates (align_corners=False).
    x = loc_x * width - 0.5
    y = loc_y * height - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    corners = []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            cy = y0 + dy
            cx = x0 + dx
            valid = (cy >= 0) & (cy <= height - 1) & (cx >= 0) & (cx <= width - 1)
            row = jnp.where(valid, cy, 0.0).astype(jnp.int32)
            col = jnp.where(valid, cx, 0.0).astype(jnp.int32)
            corners.append((start + row * width + col, jnp.where(valid, wy * wx, 0.0), valid))
    return fx, fy, corners


def bilinear_corners(
    sampling_locations: jax.Array,  # [..., L, P, 2] normalised (x, y)
    spatial_shapes: SpatialShapes,
    level_start_index: Sequence[int],
) -> tuple[jax.Array, jax.Array]:
    """Flat row indices and bilinear weights ``[..., L, P, 4]`` of every sample's corners."""
    loc = sampling_locations.astype(compute_dtype(sampling_locations.dtype))
    indices = []
    weights = []
    for level, ((height, width), start) in enumerate(zip(spatial_shapes, level_start_index, strict=True)):
        _, _, corners = level_corners(loc[..., level, :, 0], loc[..., level, :, 1], height, width, int(start))
        indices.append(jnp.stack([c[0] for c in corners], axis=-1))  # [..., P, 4]
        weights.append(jnp.stack([c[1] for c in corners], axis=-1))  # [..., P, 4]
    return jnp.stack(indices, axis=-3), jnp.stack(weights, axis=-3)


def head_major_samples(
    sampling_locations: jax.Array,  # [B, q, H, L, P, 2] normalised (x, y)
    attention_weights: jax.Array,  # [B, q, H, L, P]
    spatial_shapes: SpatialShapes,
    level_start_index: Sequence[int],
) -> tuple[jax.Array, jax.Array]:
    """Every corner of every sample as a flat row index and a combined weight, head-major.

    Returns ``(index [B, H, q, K] int32, weight [B, H, q, K])`` with ``K = L * P * 4`` and
    ``weight = attention_weight * bilinear_weight`` in the locations' compute dtype.  The index
    is piecewise constant in the locations, so every gradient of the op flows through ``weight``.
    """
    batch, num_queries, heads, num_levels, num_points, _ = sampling_locations.shape
    index, bilinear = bilinear_corners(sampling_locations, spatial_shapes, level_start_index)
    weight = bilinear * attention_weights.astype(bilinear.dtype)[..., None]  # [B, q, H, L, P, 4]
    k = num_levels * num_points * 4
    # Head-major so each (b, h) gathers rows of its own [S, Dh] slab.
    index = index.reshape(batch, num_queries, heads, k).transpose(0, 2, 1, 3)
    weight = weight.reshape(batch, num_queries, heads, k).transpose(0, 2, 1, 3)
    return index, weight


def gather_rows(value: jax.Array, index: jax.Array) -> jax.Array:
    """Rows of ``value [B, S, H, Dh]`` at per-head ``index [B, H, q, K]`` -> ``[B, H, q, K, Dh]``.

    Gathers from the free reshape ``[B, S*H, Dh]`` (row ``s*H + h``) rather than a
    head-major transposed copy of ``value``: no extra ``[B, H, S, Dh]`` buffer.
    """
    heads = value.shape[2]
    flat = value.reshape(value.shape[0], -1, value.shape[3])  # [B, S*H, Dh]
    rows = index * heads + jnp.arange(heads, dtype=index.dtype)[:, None, None]  # [B, H, q, K]

    def gather_one(v: jax.Array, idx: jax.Array) -> jax.Array:
        return jnp.take(v, idx.reshape(-1), axis=0, mode="clip").reshape(*idx.shape, v.shape[-1])

    return jax.vmap(gather_one)(flat, rows)


def weighted_sum(weight: jax.Array, rows: jax.Array, acc_dtype: jnp.dtype) -> jax.Array:
    """``sum_k weight[b, h, q, k] * rows[b, h, q, k, :]`` -> ``[B, q, H, Dh]`` in ``acc_dtype``."""
    return jnp.einsum("bhqk,bhqkd->bqhd", weight.astype(acc_dtype), rows, preferred_element_type=acc_dtype)


def ms_deform_attn_dense(
    value: jax.Array,  # [B, S, H, Dh]
    spatial_shapes: SpatialShapes,
    level_start_index: Sequence[int],
    sampling_locations: jax.Array,  # [B, Q, H, L, P, 2]
    attention_weights: jax.Array,  # [B, Q, H, L, P]
) -> jax.Array:  # [B, Q, H * Dh]
    """Reference MSDA: one packed gather of all corners of all queries, float32 accumulation.

    The simplest statement of the op, differentiated by JAX itself.  It materialises
    ``[B, H, Q, L*P*4, Dh]`` gathered rows (1.4 GiB per image for the 1024-px encoder, and the
    same again as a residual for the backward), which is why ``impl="xla"`` runs the blocked
    form in ``xla.py``; this one stays as the readable reference the tests compare against.
    """
    batch, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    index, weight = head_major_samples(sampling_locations, attention_weights, spatial_shapes, level_start_index)
    rows = gather_rows(value, index)  # [B, H, Q, K, Dh]
    out = weighted_sum(weight, rows, compute_dtype(value.dtype))  # [B, Q, H, Dh]
    return out.reshape(batch, num_queries, heads * head_dim).astype(value.dtype)


def sample_grads(
    corner_dots: Sequence[jax.Array],  # 4 x [...]: <V[corner], dL/dout>, 0 for invalid corners
    fx: jax.Array,  # [...] fractional x inside the cell
    fy: jax.Array,  # [...] fractional y inside the cell
    attention_weight: jax.Array,  # [...]
    height: int,
    width: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one sample w.r.t. its attention weight and normalised (x, y).

    Shared by the Pallas backward kernels: given the dot products of the
    output cotangent with the four (zero-padded) corner rows, the sample's
    contribution ``aw * sum_c w_c(fx, fy) * V_c`` differentiates to these
    closed forms (``d x_im / d loc_x = W_l``, ``d y_im / d loc_y = H_l``).
    """
    d00, d01, d10, d11 = corner_dots
    grad_aw = (1.0 - fy) * ((1.0 - fx) * d00 + fx * d01) + fy * ((1.0 - fx) * d10 + fx * d11)
    grad_x = attention_weight * ((1.0 - fy) * (d01 - d00) + fy * (d11 - d10)) * width
    grad_y = attention_weight * ((1.0 - fx) * (d10 - d00) + fx * (d11 - d01)) * height
    return grad_aw, grad_x, grad_y
