"""Pallas TPU kernels (Mosaic-TPU) for multi-scale deformable attention.

Mosaic cannot lower a general vector gather (``value[idx_vector]``), so the
gather is recast as a dense matmul against a one-hot *sampling matrix*: for a
block of ``block_q`` queries of one head and a tile of ``block_s`` value rows,

    Wt[q, s] = sum_{p, corner} aw[q, l, p] * w_corner[q, l, p] * (idx_corner[q, l, p] == s)

is built on the VPU with iota compares (no gathers) for the samples of one level
``l``, and the MXU computes ``out[q] += Wt @ V[tile]``.

**Visiting only reachable tiles.**  A query block's samples on level ``l`` fall in
a small window of that level (the encoder's queries sample a few pixels around
their own position), so most (query block, value tile) pairs contribute nothing.
Before the kernel, XLA computes for every (batch, head, query block, level) the
first value tile and the number of tiles its valid corners reach
(:func:`visit_table`); the table is scalar-prefetched into SMEM and the grid's
last axis walks the block's *visits*: the union of its per-level tile ranges, in
ascending tile order.  The value ``index_map`` reads the tile of the current
visit from the table; past the block's last visit it repeats the last tile, so
the pipeline issues no copy, and the body is skipped (``pl.when``).  The visit
axis keeps the static length ``nS`` (the worst case); skipped steps cost only
the grid-step overhead.  Within a visit only the levels whose range contains the
tile build their part of the sampling matrix (a tile can straddle two levels).

Backward is one kernel with the same visits (grid ``(B, H, Q-blocks, visits)``):
* ``grad_value[tile] += Wt^T @ dout``, accumulated in a ``[nS, Dh, block_s]``
  float32 slab per (b, h) that stays resident in VMEM for the whole (b, h)
  (2.8 MB for the 1024-px encoder; indexed on its leading axis, so the dynamic
  tile index needs no lane/sublane-dim dynamic slicing);
* per-corner dot products ``<V[idx_c], dout[q]>``: ``G = dout @ V[tile]^T`` on
  the MXU, then a masked lane reduction of ``G`` per corner (the same compares
  that build ``Wt``), accumulated over the visits; the closed-form
  ``sample_grads`` turns them into attention-weight and location gradients on
  the block's last step.

Cost model: per visit ``O(block_q * block_s * Dh)`` MXU flops plus
``O(block_q * block_s * P * 4)`` VPU compares.  Without the table every block
visited every tile (``Q * S`` per head); :func:`visit_stats` counts the pairs
the index maps actually visit (``benchmarks/ms_deform_attn.py --tpu-visits``
prints them at the 1024-px encoder shape).  Everything accumulates in float32
(also for float64 inputs: TPUs have no float64) and matmuls run at
``Precision.HIGHEST`` so float32 inputs keep ~1e-6 relative error.

SMEM holds the table: ``B * H * ceil(Q / block_q) * L * 2`` int32 (43 KiB for
one 1024-px image, 348 KiB for eight).

Layout: value is transposed to ``[B, H, S, Dh]`` and locations / weights to
``[B, H, Q, L*P*2]`` / ``[B, H, Q, L*P]`` so every block is a plain 2-D
(sublane, lane) tile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ms_deform_attn.kernel_common import Sizes, kernel_jit
from pallas_kernels.ms_deform_attn.reference import (
    SpatialShapes,
    level_corners,
    out_struct,
    sample_grads,
)

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_S = 512
_HIGHEST = jax.lax.Precision.HIGHEST
# Padded queries sample here: outside every level, so they reach no tile.
_OUTSIDE = -4.0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _interpret() -> pltpu.InterpretParams | bool:
    return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static geometry shared by the wrapper, the index maps and the kernels."""

    spatial_shapes: SpatialShapes
    starts: tuple[int, ...]
    points: int
    block_q: int
    block_s: int
    num_q_blocks: int
    num_tiles: int

    @property
    def levels(self) -> int:
        return len(self.spatial_shapes)

    @staticmethod
    def make(spatial_shapes: SpatialShapes, starts: tuple[int, ...], num_queries: int, seq: int,
             points: int, block_q: int = DEFAULT_BLOCK_Q, block_s: int = DEFAULT_BLOCK_S) -> "Tiling":
        """Blocks no bigger than the (padded) problem: queries in multiples of 8 (sublanes),
        value rows in multiples of 128 (lanes of the sampling matrix)."""
        block_q = min(block_q, _round_up(num_queries, 8))
        block_s = min(block_s, _round_up(seq, 128))
        return Tiling(spatial_shapes, starts, points, block_q, block_s,
                      _round_up(num_queries, block_q) // block_q, _round_up(seq, block_s) // block_s)


def _prepare(value: jax.Array, sampling_locations: jax.Array, attention_weights: jax.Array,
             tiling: Tiling) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Head-major 2-D tiles, Q and S padded to whole blocks (padded queries weigh 0 and sample nothing)."""
    batch, seq, heads, _, num_queries, levels, points = Sizes.of(value, sampling_locations)
    # TPUs have no float64: such inputs are computed in float32.
    value, sampling_locations, attention_weights = (
        x.astype(jnp.float32) if x.dtype == jnp.float64 else x for x in (value, sampling_locations, attention_weights)
    )
    q_pad = tiling.num_q_blocks * tiling.block_q - num_queries
    s_pad = tiling.num_tiles * tiling.block_s - seq
    value_t = jnp.pad(value.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad), (0, 0)))  # [B, H, Sp, Dh]
    aw = attention_weights.reshape(batch, num_queries, heads, levels * points).transpose(0, 2, 1, 3)
    aw = jnp.pad(aw, ((0, 0), (0, 0), (0, q_pad), (0, 0)))  # [B, H, Qp, L*P]
    return value_t, _head_major_locations(sampling_locations, tiling), aw


def _head_major_locations(sampling_locations: jax.Array, tiling: Tiling) -> jax.Array:
    """``[B, Q, H, L, P, 2]`` -> ``[B, H, Qp, L*P*2]``; padded queries sample outside every level."""
    batch, num_queries, heads = sampling_locations.shape[:3]
    loc = sampling_locations.reshape(batch, num_queries, heads, -1).transpose(0, 2, 1, 3)
    q_pad = tiling.num_q_blocks * tiling.block_q - num_queries
    return jnp.pad(loc, ((0, 0), (0, 0), (0, q_pad), (0, 0)), constant_values=_OUTSIDE)


def visit_table(loc: jax.Array, tiling: Tiling) -> jax.Array:
    """Per (b, h, query block, level): first value tile and number of tiles its valid corners reach.

    ``loc`` is the prepared ``[B, H, Qp, L*P*2]``.  Returns a flat int32 table (SMEM
    wants 1-D) laid out ``[B, H, nQ, L, 2]``.  Every valid corner counts, whatever its
    weight: a zero attention weight still has a gradient, which needs the corner's
    value row.  A level no corner reaches has count 0.
    """
    batch, heads, q_padded, _ = loc.shape
    big = jnp.iinfo(jnp.int32).max
    entries = []
    for level, ((height, width), start) in enumerate(zip(tiling.spatial_shapes, tiling.starts, strict=True)):
        j = level * tiling.points
        xy = loc[..., 2 * j : 2 * (j + tiling.points)].astype(jnp.float32)  # [B, H, Qp, 2P]
        _, _, corners = level_corners(xy[..., 0::2], xy[..., 1::2], height, width, start)
        lo = jnp.min(jnp.stack([jnp.where(valid, idx, big) for idx, _, valid in corners]), axis=(0, -1))
        hi = jnp.max(jnp.stack([jnp.where(valid, idx, -1) for idx, _, valid in corners]), axis=(0, -1))
        lo = lo.reshape(batch, heads, tiling.num_q_blocks, tiling.block_q).min(-1)  # [B, H, nQ]
        hi = hi.reshape(batch, heads, tiling.num_q_blocks, tiling.block_q).max(-1)
        reached = hi >= 0
        first = jnp.where(reached, lo // tiling.block_s, 0)
        count = jnp.where(reached, hi // tiling.block_s - first + 1, 0)
        entries.append(jnp.stack([first, count], -1))
    return jnp.stack(entries, -2).astype(jnp.int32).reshape(-1)  # [B * H * nQ * L * 2]


def _ranges(table, b, h, i, tiling: Tiling, heads: int) -> list[tuple[Any, Any]]:
    """``(first tile, count)`` per level of query block ``i`` of ``(b, h)``, read from the table."""
    base = ((b * heads + h) * tiling.num_q_blocks + i) * (2 * tiling.levels)
    return [(table[base + 2 * level], table[base + 2 * level + 1]) for level in range(tiling.levels)]


def _visit(table, b, h, i, j, tiling: Tiling, heads: int) -> tuple[Any, Any]:
    """``(tile, active)`` of visit ``j`` of query block ``i`` of ``(b, h)``.

    The visits are the union of the per-level tile ranges in ascending order.  Level
    ``l + 1``'s range can only meet level ``l``'s in the tile both levels share, so
    a range starting on the previous range's last tile skips that tile.  Scalar
    arithmetic on the prefetched table, shared by the index maps and the kernel
    bodies (and, vectorised over NumPy index arrays, by :func:`visit_stats`).
    Past the last visit (``active`` False) it stays on the last visited tile, so
    the value block index does not change and no copy is issued.
    """
    segments, prev_last = [], -1
    for first, count in _ranges(table, b, h, i, tiling, heads):
        shared = ((count > 0) & (first == prev_last)).astype(jnp.int32)
        segments.append((first + shared, count - shared))
        prev_last = jnp.where(count > 0, first + count - 1, prev_last)
    total = sum(count for _, count in segments)
    jj = jnp.clip(j, 0, jnp.maximum(total - 1, 0))  # stay on the last visit
    tile, offset = segments[0][0] + jj, 0
    for (first, _), (_, prev_count) in zip(segments[1:], segments[:-1], strict=True):
        offset = offset + prev_count
        tile = jnp.where(jj >= offset, first + jj - offset, tile)
    return tile, j < total


def visit_stats(sampling_locations: jax.Array, spatial_shapes: SpatialShapes, starts: tuple[int, ...],
                seq: int, block_q: int = DEFAULT_BLOCK_Q, block_s: int = DEFAULT_BLOCK_S) -> dict[str, int]:
    """(query block, value tile) pairs the kernels visit, counted by evaluating their value index map.

    ``visited``: active grid steps, i.e. (query block, tile) pairs whose sampling matrix is built
    and multiplied; ``copies``: value tiles the index map makes the pipeline copy (a new block index
    at a step; a block with no reachable tile still copies one); ``dense``: ``nQ * nS`` pairs,
    what every block visited before the table (and still the static grid size).
    """
    batch, num_queries, heads, _, points, _ = sampling_locations.shape
    tiling = Tiling.make(spatial_shapes, starts, num_queries, seq, points, block_q, block_s)
    table = np.asarray(visit_table(_head_major_locations(sampling_locations, tiling), tiling))
    b, h, i, j = np.meshgrid(np.arange(batch), np.arange(heads), np.arange(tiling.num_q_blocks),
                             np.arange(tiling.num_tiles), indexing="ij")
    tile, active = (np.asarray(x) for x in _visit(table, b, h, i, j, tiling, heads))
    flat = tile.reshape(-1)  # grid order: the visit axis fastest
    copies = 1 + int((flat[1:] != flat[:-1]).sum())
    return {
        "visited": int(active.sum()),
        "copies": copies,
        "dense": batch * heads * tiling.num_q_blocks * tiling.num_tiles,
        "block_q": tiling.block_q,
        "block_s": tiling.block_s,
    }


def _level_samples(loc_ref, aw_ref, level: int, tiling: Tiling, dtype):
    """Yields ``(j, aw, fx, fy, corners)`` for the points of one level; arrays are ``[block_q, 1]``."""
    (height, width), start = tiling.spatial_shapes[level], tiling.starts[level]
    for point in range(tiling.points):
        j = level * tiling.points + point
        loc_x = loc_ref[:, 2 * j : 2 * j + 1].astype(dtype)
        loc_y = loc_ref[:, 2 * j + 1 : 2 * j + 2].astype(dtype)
        aw = aw_ref[:, j : j + 1].astype(dtype)
        fx, fy, corners = level_corners(loc_x, loc_y, height, width, start)
        yield j, aw, fx, fy, corners


def _for_levels_in_tile(table, b, h, i, tile, active, tiling: Tiling, heads: int, body) -> None:
    """Runs ``body(l)`` for every level ``l`` whose reachable range contains ``tile`` (active visits only)."""
    for level, (first, count) in enumerate(_ranges(table, b, h, i, tiling, heads)):

        @pl.when(active & (first <= tile) & (tile < first + count))
        def _(level=level):
            body(level)


def _tile_rows(tile, shape: tuple[int, int], block_s: int) -> jax.Array:
    return tile * block_s + jax.lax.broadcasted_iota(jnp.int32, shape, 1)  # [block_q, block_s]


def _sampling_matrix(loc_ref, aw_ref, tile, level: int, tiling: Tiling, shape, dtype) -> jax.Array:
    """``Wt [block_q, block_s]``: the samples of ``level`` in tile ``tile`` as a weighted one-hot matrix."""
    rows = _tile_rows(tile, shape, tiling.block_s)
    acc = jnp.zeros(shape, dtype)
    for _, aw, _, _, corners in _level_samples(loc_ref, aw_ref, level, tiling, dtype):
        for index, weight, _ in corners:
            acc = acc + jnp.where(rows == index, aw * weight, 0.0)
    return acc


def _forward_kernel(table_ref, value_ref, loc_ref, aw_ref, out_ref, *, tiling: Tiling, heads: int):
    b, h, i, j = (pl.program_id(a) for a in range(4))
    tile, active = _visit(table_ref, b, h, i, j, tiling, heads)

    @pl.when(j == 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    def add(static_level: int) -> None:
        shape = (out_ref.shape[0], tiling.block_s)
        wt = _sampling_matrix(loc_ref, aw_ref, tile, static_level, tiling, shape, out_ref.dtype)
        out_ref[...] += jnp.dot(wt, value_ref[...].astype(wt.dtype), precision=_HIGHEST,
                                preferred_element_type=out_ref.dtype)

    _for_levels_in_tile(table_ref, b, h, i, tile, active, tiling, heads, add)


def _backward_kernel(
    table_ref, value_ref, loc_ref, aw_ref, grad_out_ref,
    grad_value_ref, grad_loc_ref, grad_aw_ref, dots_ref, *, tiling: Tiling, heads: int,
):
    b, h, i, j = (pl.program_id(a) for a in range(4))
    tile, active = _visit(table_ref, b, h, i, j, tiling, heads)
    acc_dtype = dots_ref.dtype

    @pl.when((i == 0) & (j == 0))
    def _():
        grad_value_ref[...] = jnp.zeros(grad_value_ref.shape, grad_value_ref.dtype)

    @pl.when(j == 0)
    def _():
        dots_ref[...] = jnp.zeros(dots_ref.shape, dots_ref.dtype)

    def add(static_level: int) -> None:
        grad_out = grad_out_ref[...].astype(acc_dtype)  # [block_q, Dh]
        # G[q, s] = <dout[q], V[s]> for the rows of this tile.
        g = jax.lax.dot_general(grad_out, value_ref[...].astype(acc_dtype), (((1,), (1,)), ((), ())),
                                precision=_HIGHEST, preferred_element_type=acc_dtype)  # [block_q, block_s]
        rows = _tile_rows(tile, g.shape, tiling.block_s)
        wt = jnp.zeros(g.shape, acc_dtype)
        for jp, aw, _, _, corners in _level_samples(loc_ref, aw_ref, static_level, tiling, acc_dtype):
            for c, (index, weight, valid) in enumerate(corners):
                hit = rows == index
                wt = wt + jnp.where(hit, aw * weight, 0.0)
                k = 4 * jp + c
                dots_ref[:, k : k + 1] += jnp.sum(jnp.where(hit & valid, g, 0.0), axis=1, keepdims=True)
        # grad_value[tile] += Wt^T @ dout, kept transposed: [Dh, block_s]
        grad_value_ref[tile] += jax.lax.dot_general(grad_out, wt, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                                                    preferred_element_type=acc_dtype)

    _for_levels_in_tile(table_ref, b, h, i, tile, active, tiling, heads, add)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        for lvl, (height, width) in enumerate(tiling.spatial_shapes):
            for jp, aw, fx, fy, _ in _level_samples(loc_ref, aw_ref, lvl, tiling, acc_dtype):
                dots = [dots_ref[:, 4 * jp + c : 4 * jp + c + 1] for c in range(4)]
                grad_aw, grad_x, grad_y = sample_grads(dots, fx, fy, aw, height, width)
                grad_aw_ref[:, jp : jp + 1] = grad_aw.astype(grad_aw_ref.dtype)
                grad_loc_ref[:, 2 * jp : 2 * jp + 1] = grad_x.astype(grad_loc_ref.dtype)
                grad_loc_ref[:, 2 * jp + 1 : 2 * jp + 2] = grad_y.astype(grad_loc_ref.dtype)


def _specs(tiling: Tiling, heads: int, head_dim: int, k_loc: int, k_aw: int):
    """BlockSpecs for grid ``(B, H, Q-blocks, visits)``; index maps take the prefetched table last."""

    def value_map(b, h, i, j, table):
        tile, _ = _visit(table, b, h, i, j, tiling, heads)
        return (b, h, tile, 0)

    def q_map(b, h, i, j, table):
        return (b, h, i, 0)

    value_spec = pl.BlockSpec((None, None, tiling.block_s, head_dim), value_map)
    loc_spec = pl.BlockSpec((None, None, tiling.block_q, k_loc), q_map)
    aw_spec = pl.BlockSpec((None, None, tiling.block_q, k_aw), q_map)
    row_spec = pl.BlockSpec((None, None, tiling.block_q, head_dim), q_map)
    return value_spec, loc_spec, aw_spec, row_spec


def _params(*semantics: str) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


@kernel_jit("block_q", "block_s")
def forward(value: jax.Array, spatial_shapes: SpatialShapes, level_start_index: tuple[int, ...],
            sampling_locations: jax.Array, attention_weights: jax.Array, *,
            block_q: int = DEFAULT_BLOCK_Q, block_s: int = DEFAULT_BLOCK_S) -> jax.Array:
    """MSDA forward (operands and result as in ``kernel_common``)."""
    batch, seq, heads, head_dim, num_queries, _, points = Sizes.of(value, sampling_locations)
    tiling = Tiling.make(spatial_shapes, level_start_index, num_queries, seq, points, block_q, block_s)
    acc_dtype = jnp.float32  # TPUs have no float64; the interpreter mirrors that
    value_t, loc, aw = _prepare(value, sampling_locations, attention_weights, tiling)
    value_spec, loc_spec, aw_spec, row_spec = _specs(tiling, heads, head_dim, loc.shape[3], aw.shape[3])
    out = pl.pallas_call(
        functools.partial(_forward_kernel, tiling=tiling, heads=heads),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads, tiling.num_q_blocks, tiling.num_tiles),
            in_specs=[value_spec, loc_spec, aw_spec],
            out_specs=row_spec,
        ),
        out_shape=out_struct((batch, heads, loc.shape[2], head_dim), acc_dtype, loc),
        # The visit axis is the reduction (accumulator resident in VMEM).
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=_interpret(),
        name="ms_deform_attn_fwd_tpu",
    )(visit_table(loc, tiling), value_t, loc, aw)
    return out[:, :, :num_queries].transpose(0, 2, 1, 3).astype(value.dtype)


@kernel_jit("block_q", "block_s")
def backward(value: jax.Array, spatial_shapes: SpatialShapes, level_start_index: tuple[int, ...],
             sampling_locations: jax.Array, attention_weights: jax.Array, grad_out: jax.Array, *,
             block_q: int = DEFAULT_BLOCK_Q, block_s: int = DEFAULT_BLOCK_S) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MSDA backward: the gradients of value, sampling_locations and attention_weights (``kernel_common``)."""
    batch, seq, heads, head_dim, num_queries, levels, points = Sizes.of(value, sampling_locations)
    tiling = Tiling.make(spatial_shapes, level_start_index, num_queries, seq, points, block_q, block_s)
    value_t, loc, aw = _prepare(value, sampling_locations, attention_weights, tiling)
    q_padded = loc.shape[2]
    grad_out_t = jnp.pad(grad_out.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, q_padded - num_queries), (0, 0)))
    acc_dtype = jnp.float32  # TPUs have no float64; the interpreter mirrors that
    value_spec, loc_spec, aw_spec, row_spec = _specs(tiling, heads, head_dim, loc.shape[3], aw.shape[3])
    slab = (tiling.num_tiles, head_dim, tiling.block_s)
    # One (b, h)'s grad_value stays resident across all its query blocks and visits.
    slab_spec = pl.BlockSpec((None, None, *slab), lambda b, h, i, j, table: (b, h, 0, 0, 0))
    grad_value, grad_loc, grad_aw = pl.pallas_call(
        functools.partial(_backward_kernel, tiling=tiling, heads=heads),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads, tiling.num_q_blocks, tiling.num_tiles),
            in_specs=[value_spec, loc_spec, aw_spec, row_spec],
            out_specs=[slab_spec, loc_spec, aw_spec],
            scratch_shapes=[pltpu.VMEM((tiling.block_q, 4 * levels * points), acc_dtype)],
        ),
        out_shape=[
            out_struct((batch, heads, *slab), acc_dtype, loc),
            out_struct(loc.shape, acc_dtype, loc),
            out_struct(aw.shape, acc_dtype, loc),
        ],
        # Query blocks and visits both reduce into the resident grad_value slab.
        compiler_params=_params("parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=_interpret(),
        name="ms_deform_attn_bwd_tpu",
    )(visit_table(loc, tiling), value_t, loc, aw, grad_out_t)

    grad_value = grad_value.transpose(0, 1, 2, 4, 3).reshape(batch, heads, -1, head_dim)[:, :, :seq]
    grad_value = grad_value.transpose(0, 2, 1, 3).astype(value.dtype)
    grad_loc = grad_loc[:, :, :num_queries].transpose(0, 2, 1, 3).reshape(sampling_locations.shape)
    grad_aw = grad_aw[:, :, :num_queries].transpose(0, 2, 1, 3).reshape(attention_weights.shape)
    return grad_value, grad_loc.astype(sampling_locations.dtype), grad_aw.astype(attention_weights.dtype)
