"""Pallas TPU kernels (Mosaic-TPU) for multi-scale deformable attention.

Mosaic cannot lower a general vector gather (``value[idx_vector]``), so the
gather is recast as a dense matmul against a one-hot *sampling matrix*: for a
block of ``block_q`` queries of one head and a tile of ``block_s`` value rows,

    Wt[q, s] = sum_{l, p, corner} aw[q, l, p] * w_corner[q, l, p] * (idx_corner[q, l, p] == s)

is built on the VPU with iota compares (no gathers), and the MXU computes
``out[q] += Wt @ V[tile]``.  The value tile streams through VMEM via the
ordinary BlockSpec pipeline, the accumulator stays resident across the
``S``-tile axis (last grid axis, "arbitrary").  Each tile only visits the
levels it overlaps (``pl.when`` on static level bounds), so a tile costs
``P * 4`` compares per element of ``Wt`` per overlapped level.

Backward uses the same matrix twice, in two kernels because the reductions
run over different axes:
* ``grad_value[tile] = sum_q Wt^T @ dout`` (grid ``(B, H, S-tiles, Q-blocks)``,
  reduction over query blocks);
* per-corner dot products ``<V[idx_c], dout[q]>``: ``G = dout @ V[tile]^T`` on
  the MXU, then a masked lane reduction of ``G`` per corner, accumulated over
  S-tiles; the closed-form ``sample_grads`` turns them into attention-weight
  and location gradients on the last tile.

Cost model: the work is ``O(Q * S * Dh)`` MXU flops plus ``O(Q * S * P * 4)``
VPU compares per head, independent of where the samples fall.  That is cheap
for the decoder (Q <= 900) but heavy for the encoder (Q = S = 21,760); skipping
untouched tiles with scalar-prefetched per-block tile ranges is the known next
step.  Everything accumulates in float32 (also for float64 inputs: TPUs have
no float64) and matmuls run at ``Precision.HIGHEST`` so float32 inputs keep
~1e-6 relative error.

Layout: value is transposed to ``[B, H, S, Dh]`` and locations / weights to
``[B, H, Q, L*P*2]`` / ``[B, H, Q, L*P]`` so every block is a plain 2-D
(sublane, lane) tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ms_deform_attn.reference import (
    SpatialShapes,
    level_corners,
    out_struct,
    sample_grads,
)

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_S = 512
_HIGHEST = jax.lax.Precision.HIGHEST


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _interpret() -> pltpu.InterpretParams | bool:
    return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()


def _block_sizes(num_queries: int, seq: int) -> tuple[int, int]:
    return min(DEFAULT_BLOCK_Q, _round_up(num_queries, 8)), min(DEFAULT_BLOCK_S, _round_up(seq, 128))


def _prepare(
    value: jax.Array,  # [B, S, H, Dh]
    sampling_locations: jax.Array,  # [B, Q, H, L, P, 2]
    attention_weights: jax.Array,  # [B, Q, H, L, P]
    block_q: int,
    block_s: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Head-major 2-D tiles, Q and S padded to whole blocks (padding weighs 0)."""
    batch, num_queries, heads, levels, points, _ = sampling_locations.shape
    seq = value.shape[1]
    # TPUs have no float64: such inputs are computed in float32.
    value, sampling_locations, attention_weights = (
        x.astype(jnp.float32) if x.dtype == jnp.float64 else x for x in (value, sampling_locations, attention_weights)
    )
    q_pad = _round_up(num_queries, block_q) - num_queries
    s_pad = _round_up(seq, block_s) - seq
    value_t = jnp.pad(value.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad), (0, 0)))  # [B, H, Sp, Dh]
    loc = sampling_locations.reshape(batch, num_queries, heads, levels * points * 2).transpose(0, 2, 1, 3)
    aw = attention_weights.reshape(batch, num_queries, heads, levels * points).transpose(0, 2, 1, 3)
    loc = jnp.pad(loc, ((0, 0), (0, 0), (0, q_pad), (0, 0)))  # [B, H, Qp, L*P*2]
    aw = jnp.pad(aw, ((0, 0), (0, 0), (0, q_pad), (0, 0)))  # [B, H, Qp, L*P]
    return value_t, loc, aw


def _for_overlapping_levels(tile, block_s: int, spatial_shapes: SpatialShapes, starts: tuple[int, ...], body):
    """Runs ``body(level, height, width, start)`` for each level overlapping S-tile ``tile``."""
    lo = tile * block_s
    for level, ((height, width), start) in enumerate(zip(spatial_shapes, starts)):
        end = start + height * width

        @pl.when((lo < end) & (lo + block_s > start))
        def _(level=level, height=height, width=width, start=start):
            body(level, height, width, start)


def _level_samples(loc_ref, aw_ref, level: int, points: int, height: int, width: int, start: int, dtype):
    """Yields ``(j, aw, fx, fy, corners)`` for the points of one level; arrays are ``[block_q, 1]``."""
    for point in range(points):
        j = level * points + point
        loc_x = loc_ref[:, 2 * j : 2 * j + 1].astype(dtype)
        loc_y = loc_ref[:, 2 * j + 1 : 2 * j + 2].astype(dtype)
        aw = aw_ref[:, j : j + 1].astype(dtype)
        fx, fy, corners = level_corners(loc_x, loc_y, height, width, start)
        yield j, aw, fx, fy, corners


def _build_sampling_matrix(w_ref, loc_ref, aw_ref, tile, *, spatial_shapes, starts, points) -> None:
    """Fills ``w_ref [block_q, block_s]`` with the sampling matrix of S-tile ``tile``."""
    block_s = w_ref.shape[1]
    rows = tile * block_s + jax.lax.broadcasted_iota(jnp.int32, w_ref.shape, 1)  # [block_q, block_s]
    w_ref[...] = jnp.zeros(w_ref.shape, w_ref.dtype)

    def add_level(level, height, width, start):
        acc = w_ref[...]
        for _, aw, _, _, corners in _level_samples(loc_ref, aw_ref, level, points, height, width, start, w_ref.dtype):
            for index, weight, _ in corners:
                acc = acc + jnp.where(rows == index, aw * weight, 0.0)
        w_ref[...] = acc

    _for_overlapping_levels(tile, block_s, spatial_shapes, starts, add_level)


def _forward_kernel(value_ref, loc_ref, aw_ref, out_ref, w_ref, *, spatial_shapes, starts, points):
    tile = pl.program_id(3)

    @pl.when(tile == 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    _build_sampling_matrix(w_ref, loc_ref, aw_ref, tile, spatial_shapes=spatial_shapes, starts=starts, points=points)
    out_ref[...] += jnp.dot(
        w_ref[...], value_ref[...].astype(w_ref.dtype), precision=_HIGHEST, preferred_element_type=out_ref.dtype
    )


def _grad_value_kernel(loc_ref, aw_ref, grad_out_ref, grad_value_ref, w_ref, *, spatial_shapes, starts, points):
    tile, qblock = pl.program_id(2), pl.program_id(3)

    @pl.when(qblock == 0)
    def _():
        grad_value_ref[...] = jnp.zeros(grad_value_ref.shape, grad_value_ref.dtype)

    _build_sampling_matrix(w_ref, loc_ref, aw_ref, tile, spatial_shapes=spatial_shapes, starts=starts, points=points)
    grad_value_ref[...] += jax.lax.dot_general(
        w_ref[...],
        grad_out_ref[...].astype(w_ref.dtype),
        (((0,), (0,)), ((), ())),  # Wt^T @ dout: [block_s, Dh]
        precision=_HIGHEST,
        preferred_element_type=grad_value_ref.dtype,
    )


def _grad_samples_kernel(
    value_ref, loc_ref, aw_ref, grad_out_ref, grad_loc_ref, grad_aw_ref, dots_ref, *, spatial_shapes, starts, points
):
    tile = pl.program_id(3)
    block_s = value_ref.shape[0]
    acc_dtype = dots_ref.dtype

    @pl.when(tile == 0)
    def _():
        dots_ref[...] = jnp.zeros(dots_ref.shape, dots_ref.dtype)

    # G[q, s] = <dout[q], V[s]> for the rows of this tile.
    g = jax.lax.dot_general(
        grad_out_ref[...].astype(acc_dtype),
        value_ref[...].astype(acc_dtype),
        (((1,), (1,)), ((), ())),
        precision=_HIGHEST,
        preferred_element_type=acc_dtype,
    )  # [block_q, block_s]
    rows = tile * block_s + jax.lax.broadcasted_iota(jnp.int32, g.shape, 1)

    def add_level(level, height, width, start):
        for j, _, _, _, corners in _level_samples(loc_ref, aw_ref, level, points, height, width, start, acc_dtype):
            for c, (index, _, valid) in enumerate(corners):
                k = 4 * j + c
                hit = (rows == index) & valid
                dots_ref[:, k : k + 1] += jnp.sum(jnp.where(hit, g, 0.0), axis=1, keepdims=True)

    _for_overlapping_levels(tile, block_s, spatial_shapes, starts, add_level)

    @pl.when(tile == pl.num_programs(3) - 1)
    def _():
        for level, ((height, width), start) in enumerate(zip(spatial_shapes, starts)):
            for j, aw, fx, fy, _ in _level_samples(
                loc_ref, aw_ref, level, points, height, width, start, acc_dtype
            ):
                dots = [dots_ref[:, 4 * j + c : 4 * j + c + 1] for c in range(4)]
                grad_aw, grad_x, grad_y = sample_grads(dots, fx, fy, aw, height, width)
                grad_aw_ref[:, j : j + 1] = grad_aw.astype(grad_aw_ref.dtype)
                grad_loc_ref[:, 2 * j : 2 * j + 1] = grad_x.astype(grad_loc_ref.dtype)
                grad_loc_ref[:, 2 * j + 1 : 2 * j + 2] = grad_y.astype(grad_loc_ref.dtype)


def _specs(block_q: int, block_s: int, head_dim: int, k_loc: int, k_aw: int, s_minor: bool):
    """BlockSpecs for grid ``(B, H, Q-blocks, S-tiles)`` or, if ``s_minor`` is False, ``(B, H, S-tiles, Q-blocks)``."""

    def q_map(b, h, i, j):
        return (b, h, i if s_minor else j, 0)

    def s_map(b, h, i, j):
        return (b, h, j if s_minor else i, 0)

    value_spec = pl.BlockSpec((None, None, block_s, head_dim), s_map)
    loc_spec = pl.BlockSpec((None, None, block_q, k_loc), q_map)
    aw_spec = pl.BlockSpec((None, None, block_q, k_aw), q_map)
    row_spec = pl.BlockSpec((None, None, block_q, head_dim), q_map)
    return value_spec, loc_spec, aw_spec, row_spec


def _params() -> pltpu.CompilerParams:
    # The last grid axis is the reduction (accumulator resident in VMEM).
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnums=(1, 2))
def forward(
    value: jax.Array,  # [B, S, H, Dh]
    spatial_shapes: SpatialShapes,
    level_start_index: tuple[int, ...],
    sampling_locations: jax.Array,  # [B, Q, H, L, P, 2]
    attention_weights: jax.Array,  # [B, Q, H, L, P]
) -> jax.Array:  # [B, Q, H, Dh]
    batch, seq, heads, head_dim = value.shape
    num_queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    block_q, block_s = _block_sizes(num_queries, seq)
    acc_dtype = jnp.float32  # TPUs have no float64; the interpreter mirrors that
    value_t, loc, aw = _prepare(value, sampling_locations, attention_weights, block_q, block_s)
    value_spec, loc_spec, aw_spec, row_spec = _specs(block_q, block_s, head_dim, loc.shape[3], aw.shape[3], True)
    kernel = functools.partial(_forward_kernel, spatial_shapes=spatial_shapes, starts=level_start_index, points=points)
    out = pl.pallas_call(
        kernel,
        grid=(batch, heads, loc.shape[2] // block_q, value_t.shape[2] // block_s),
        in_specs=[value_spec, loc_spec, aw_spec],
        out_specs=row_spec,
        out_shape=out_struct((batch, heads, loc.shape[2], head_dim), acc_dtype, loc),
        scratch_shapes=[pltpu.VMEM((block_q, block_s), acc_dtype)],
        compiler_params=_params(),
        interpret=_interpret(),
        name="ms_deform_attn_fwd_tpu",
    )(value_t, loc, aw)
    return out[:, :, :num_queries].transpose(0, 2, 1, 3).astype(value.dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def backward(
    value: jax.Array,  # [B, S, H, Dh]
    spatial_shapes: SpatialShapes,
    level_start_index: tuple[int, ...],
    sampling_locations: jax.Array,  # [B, Q, H, L, P, 2]
    attention_weights: jax.Array,  # [B, Q, H, L, P]
    grad_out: jax.Array,  # [B, Q, H, Dh]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    batch, seq, heads, head_dim = value.shape
    num_queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    block_q, block_s = _block_sizes(num_queries, seq)
    value_t, loc, aw = _prepare(value, sampling_locations, attention_weights, block_q, block_s)
    q_padded, s_padded = loc.shape[2], value_t.shape[2]
    grad_out_t = jnp.pad(grad_out.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, q_padded - num_queries), (0, 0)))
    acc_dtype = jnp.float32  # TPUs have no float64; the interpreter mirrors that
    statics = dict(spatial_shapes=spatial_shapes, starts=level_start_index, points=points)
    interpret = _interpret()

    value_spec, loc_spec, aw_spec, row_spec = _specs(block_q, block_s, head_dim, loc.shape[3], aw.shape[3], False)
    grad_value = pl.pallas_call(
        functools.partial(_grad_value_kernel, **statics),
        grid=(batch, heads, s_padded // block_s, q_padded // block_q),
        in_specs=[loc_spec, aw_spec, row_spec],
        out_specs=value_spec,
        out_shape=out_struct(value_t.shape, acc_dtype, loc),
        scratch_shapes=[pltpu.VMEM((block_q, block_s), acc_dtype)],
        compiler_params=_params(),
        interpret=interpret,
        name="ms_deform_attn_bwd_value_tpu",
    )(loc, aw, grad_out_t)

    value_spec, loc_spec, aw_spec, row_spec = _specs(block_q, block_s, head_dim, loc.shape[3], aw.shape[3], True)
    grad_loc, grad_aw = pl.pallas_call(
        functools.partial(_grad_samples_kernel, **statics),
        grid=(batch, heads, q_padded // block_q, s_padded // block_s),
        in_specs=[value_spec, loc_spec, aw_spec, row_spec],
        out_specs=[loc_spec, aw_spec],
        out_shape=[
            out_struct(loc.shape, acc_dtype, loc),
            out_struct(aw.shape, acc_dtype, loc),
        ],
        scratch_shapes=[pltpu.VMEM((block_q, 4 * levels * points), acc_dtype)],
        compiler_params=_params(),
        interpret=interpret,
        name="ms_deform_attn_bwd_samples_tpu",
    )(value_t, loc, aw, grad_out_t)

    grad_value = grad_value[:, :, :seq].transpose(0, 2, 1, 3).astype(value.dtype)
    grad_loc = grad_loc[:, :, :num_queries].transpose(0, 2, 1, 3).reshape(sampling_locations.shape)
    grad_aw = grad_aw[:, :, :num_queries].transpose(0, 2, 1, 3).reshape(attention_weights.shape)
    return grad_value, grad_loc.astype(sampling_locations.dtype), grad_aw.astype(attention_weights.dtype)
