"""Pallas GPU kernels (Triton backend) for multi-scale deformable attention.

Why Triton rather than Mosaic-GPU: MSDA is a data-dependent *gather*
(every query reads 64 arbitrary value rows per head) followed by a tiny
weighted sum; there is no matmul to feed to tensor cores and nothing a TMA
bulk copy can prefetch, because the addresses are only known after reading
the sampling locations.  Triton lowers ``ref[int_array, :]`` to per-lane
pointer loads and ``atomic_add`` to hardware float atomics, which is exactly
what the forward gather and the backward scatter need, and it runs in
``interpret=True`` on CPU so the kernels are tested without a GPU.

Work decomposition (both kernels): grid ``(B, H, Q / block_q)``; one program
owns ``block_q`` queries of one head and keeps their ``[block_q, Dh]``
accumulator in registers.  Levels and points are unrolled statically (SegLLM:
4 levels x 4 points x 4 corners = 64 row gathers of ``Dh`` contiguous
elements).  Consecutive programs share ``(b, h)``, so the ``[S, Dh]`` value
slab they read (2.8 MB at 1024x1024, f32) stays in L2.

Forward: ``out[q] = sum_{l,p,c} aw * w_c * V[idx_c]`` accumulated in float32
in level -> point -> corner order (the CUDA op's order).
Backward: each sample recomputes its corners, scatters
``aw * w_c * dout[q]`` into a float32 ``grad_value`` with ``atomic_add``
(so grad_value summation order is non-deterministic, as in the CUDA op),
and turns the four corner dot products ``<V[idx_c], dout[q]>`` into the
attention-weight and location gradients in closed form.

Triton needs power-of-two tensor sizes, so the wrapper pads ``Dh`` and
``P`` up to powers of two (padded points have zero weight) and ``Q`` up to
a multiple of ``block_q``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ms_deform_attn.kernel_common import Sizes, kernel_jit
from pallas_kernels.ms_deform_attn.reference import (
    SpatialShapes,
    compute_dtype,
    level_corners,
    out_struct,
    sample_grads,
)

DEFAULT_BLOCK_Q = 64
NUM_WARPS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _prepare(value: jax.Array, sampling_locations: jax.Array, attention_weights: jax.Array,
             block_q: int) -> tuple[jax.Array, jax.Array, jax.Array, int, int]:
    """Pads to Triton-friendly sizes and flattens (L, P[, 2]) into one axis."""
    batch, _, heads, _, num_queries, levels, points = Sizes.of(value, sampling_locations)
    q_pad = pl.cdiv(num_queries, block_q) * block_q
    p_pad = _next_pow2(points)
    value = _pad_axis(value, 3, _next_pow2(value.shape[3]))
    loc = _pad_axis(_pad_axis(sampling_locations, 4, p_pad), 1, q_pad)
    aw = _pad_axis(_pad_axis(attention_weights, 4, p_pad), 1, q_pad)  # padded samples weigh 0
    loc = loc.reshape(batch, q_pad, heads, levels * p_pad * 2)  # [B, Qp, H, L*Pp*2]
    aw = aw.reshape(batch, q_pad, heads, levels * p_pad)  # [B, Qp, H, L*Pp]
    return value, loc, aw, q_pad, p_pad


def _specs(seq: int, head_dim: int, block_q: int, levels: int, points: int) -> tuple[pl.BlockSpec, ...]:
    value_spec = pl.BlockSpec((None, seq, None, head_dim), lambda b, h, q: (b, 0, h, 0))
    loc_spec = pl.BlockSpec((None, block_q, None, levels * points * 2), lambda b, h, q: (b, q, h, 0))
    aw_spec = pl.BlockSpec((None, block_q, None, levels * points), lambda b, h, q: (b, q, h, 0))
    row_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, q: (b, q, h, 0))
    return value_spec, loc_spec, aw_spec, row_spec


def _samples(loc_ref, aw_ref, spatial_shapes: SpatialShapes, starts: tuple[int, ...], points: int, acc_dtype):
    """Yields ``(j, level, aw, fx, fy, corners)`` for every (level, point), unrolled."""
    for level, ((height, width), start) in enumerate(zip(spatial_shapes, starts, strict=True)):
        for point in range(points):
            j = level * points + point
            loc_x = loc_ref[:, 2 * j].astype(acc_dtype)  # [block_q]
            loc_y = loc_ref[:, 2 * j + 1].astype(acc_dtype)  # [block_q]
            aw = aw_ref[:, j].astype(acc_dtype)  # [block_q]
            fx, fy, corners = level_corners(loc_x, loc_y, height, width, start)
            yield j, (height, width), aw, fx, fy, corners


def _forward_kernel(value_ref, loc_ref, aw_ref, out_ref, *, spatial_shapes, starts, points):
    acc_dtype = compute_dtype(value_ref.dtype)
    acc = jnp.zeros(out_ref.shape, acc_dtype)  # [block_q, Dh]
    for _, _, aw, _, _, corners in _samples(loc_ref, aw_ref, spatial_shapes, starts, points, acc_dtype):
        for index, weight, _ in corners:
            rows = value_ref[index, :].astype(acc_dtype)  # [block_q, Dh] gather
            acc += (aw * weight)[:, None] * rows
    out_ref[...] = acc.astype(out_ref.dtype)


def _scatter_add_rows(ref, index: jax.Array, rows: jax.Array) -> None:
    """``ref[index[i], :] += rows[i]`` for every i, duplicates accumulating.

    On a GPU this is one vector ``atomic_add`` (hardware atomics resolve
    duplicate rows).  JAX's interpreter discharges an array-indexed atomic as
    ``ref.at[index].set(ref[index] + rows)``, which drops all but one of the
    duplicates, so interpret mode issues one row-atomic per query instead
    (the scalar-index path of the interpreter is exact).
    """
    if not _interpret():
        plgpu.atomic_add(ref, (index, slice(None)), rows)
        return

    def body(i, carry):
        # An explicit int32 column start: under x64 a bare slice would start at an
        # int64 and the interpreter's dynamic_slice rejects mixed index dtypes.
        columns = pl.ds(jnp.zeros((), index.dtype), rows.shape[1])
        plgpu.atomic_add(ref, (index[i], columns), rows[i])
        return carry

    jax.lax.fori_loop(0, rows.shape[0], body, 0)


def _backward_kernel(
    value_ref, loc_ref, aw_ref, grad_out_ref, _grad_value_in_ref,
    grad_value_ref, grad_loc_ref, grad_aw_ref, *, spatial_shapes, starts, points,
):
    acc_dtype = compute_dtype(value_ref.dtype)
    grad_out = grad_out_ref[...].astype(acc_dtype)  # [block_q, Dh]
    for j, (height, width), aw, fx, fy, corners in _samples(
        loc_ref, aw_ref, spatial_shapes, starts, points, acc_dtype
    ):
        dots = []
        for index, weight, valid in corners:
            rows = value_ref[index, :].astype(acc_dtype)  # [block_q, Dh]
            # Invalid corners carry weight 0 and index `start`: adding 0 there is harmless.
            _scatter_add_rows(grad_value_ref, index, (aw * weight)[:, None] * grad_out)
            dots.append(jnp.where(valid, jnp.sum(rows * grad_out, axis=1), 0.0))
        grad_aw, grad_x, grad_y = sample_grads(dots, fx, fy, aw, height, width)
        grad_aw_ref[:, j] = grad_aw.astype(grad_aw_ref.dtype)
        grad_loc_ref[:, 2 * j] = grad_x.astype(grad_loc_ref.dtype)
        grad_loc_ref[:, 2 * j + 1] = grad_y.astype(grad_loc_ref.dtype)


@kernel_jit("block_q")
def forward(value: jax.Array, spatial_shapes: SpatialShapes, level_start_index: tuple[int, ...],
            sampling_locations: jax.Array, attention_weights: jax.Array, *,
            block_q: int = DEFAULT_BLOCK_Q) -> jax.Array:
    """MSDA forward (operands and result as in ``kernel_common``)."""
    batch, seq, heads, head_dim, num_queries, levels, _ = Sizes.of(value, sampling_locations)
    value_p, loc, aw, q_pad, p_pad = _prepare(value, sampling_locations, attention_weights, block_q)
    value_spec, loc_spec, aw_spec, row_spec = _specs(seq, value_p.shape[3], block_q, levels, p_pad)
    kernel = functools.partial(
        _forward_kernel, spatial_shapes=spatial_shapes, starts=level_start_index, points=p_pad
    )
    out = pl.pallas_call(
        kernel,
        grid=(batch, heads, q_pad // block_q),
        in_specs=[value_spec, loc_spec, aw_spec],
        out_specs=row_spec,
        out_shape=out_struct((batch, q_pad, heads, value_p.shape[3]), value.dtype, loc),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=_interpret(),
        name="ms_deform_attn_fwd",
    )(value_p, loc, aw)
    return out[:, :num_queries, :, :head_dim]


@kernel_jit("block_q")
def backward(value: jax.Array, spatial_shapes: SpatialShapes, level_start_index: tuple[int, ...],
             sampling_locations: jax.Array, attention_weights: jax.Array, grad_out: jax.Array, *,
             block_q: int = DEFAULT_BLOCK_Q) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MSDA backward: the gradients of value, sampling_locations and attention_weights (``kernel_common``)."""
    batch, seq, heads, head_dim, num_queries, levels, points = Sizes.of(value, sampling_locations)
    value_p, loc, aw, q_pad, p_pad = _prepare(value, sampling_locations, attention_weights, block_q)
    dh_pad = value_p.shape[3]
    grad_out = _pad_axis(_pad_axis(grad_out, 3, dh_pad), 1, q_pad)  # [B, Qp, H, Dhp]
    acc_dtype = compute_dtype(value.dtype)
    value_spec, loc_spec, aw_spec, row_spec = _specs(seq, dh_pad, block_q, levels, p_pad)
    kernel = functools.partial(
        _backward_kernel, spatial_shapes=spatial_shapes, starts=level_start_index, points=p_pad
    )
    grad_value, grad_loc, grad_aw = pl.pallas_call(
        kernel,
        grid=(batch, heads, q_pad // block_q),
        in_specs=[value_spec, loc_spec, aw_spec, row_spec, value_spec],
        out_specs=[value_spec, loc_spec, aw_spec],
        out_shape=[
            out_struct((batch, seq, heads, dh_pad), acc_dtype, loc),
            out_struct(loc.shape, sampling_locations.dtype, loc),
            out_struct(aw.shape, attention_weights.dtype, loc),
        ],
        # grad_value is accumulated with atomics into a zero-initialised buffer.
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=_interpret(),
        name="ms_deform_attn_bwd",
    )(value_p, loc, aw, grad_out, jnp.zeros((batch, seq, heads, dh_pad), acc_dtype))
    grad_loc = grad_loc.reshape(batch, q_pad, heads, levels, p_pad, 2)[:, :num_queries, :, :, :points]
    grad_aw = grad_aw.reshape(batch, q_pad, heads, levels, p_pad)[:, :num_queries, :, :, :points]
    return grad_value[..., :head_dim].astype(value.dtype), grad_loc, grad_aw
