"""The ``impl="xla"`` path: multi-scale deformable attention in query blocks, bounded memory.

The dense reference (``reference.ms_deform_attn_dense``) gathers every corner row of every
query at once: ``[B, H, Q, L*P*4, Dh]``, 1.4 GiB per image for HIPIE's 1024-px encoder
(Q = S = 21,760), and JAX's autodiff keeps that tensor again as a residual for the backward.
Here the queries are processed in blocks inside a ``fori_loop``, so the gathered rows exist for
one block at a time:

* **block size from a memory budget**: ``block_q = budget / (B * H * K * Dh * itemsize)``
  (``K = L*P*4``), so a batch of 8 prompts gets blocks 8x smaller than one prompt and the
  temporaries stay the same size.  Blocks of 8-16 MiB of rows are also *faster* on a CPU than
  the dense form (the rows stay in cache between the gather and the weighted sum).
* **custom VJP**: the forward saves only its inputs.  The backward walks the same blocks,
  recomputes each block's corner indices, weights and rows, and
  - scatter-adds ``weight * dout`` into a ``[B, H, S, Dh]`` float32 ``grad_value`` carried by
    the loop (updated in place),
  - forms ``grad_weight = <rows, dout>`` and pulls it back through the (elementwise) weight
    computation with ``jax.vjp`` to get the location and attention-weight gradients; the corner
    indices are piecewise constant, so nothing else depends on the locations.

Each block computes exactly what the dense reference computes for those queries (same
expressions, same float32 accumulation), so the forward is bitwise equal to it; the backward
equals JAX's gradient of the dense reference up to float32 summation order (and is more accurate
for bf16 values: ``grad_value`` accumulates in float32 before the final cast).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp

from pallas_kernels.ms_deform_attn.reference import (
    SpatialShapes,
    compute_dtype,
    gather_rows,
    head_major_samples,
    weighted_sum,
)

# Gathered rows per block (the dominant temporary).  CPU: 8-32 MiB measured fastest on a 2-core
# machine (the block's rows stay in cache between the gather and the weighted sum).  GPU/TPU:
# bigger blocks, so each loop iteration's kernels stay large next to their launch overhead.
DEFAULT_BLOCK_BYTES = 16 * 2**20
ACCELERATOR_BLOCK_BYTES = 256 * 2**20


def default_block_bytes() -> int:
    return DEFAULT_BLOCK_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_BYTES
_MIN_BLOCK_Q = 8

Carry = TypeVar("Carry")


def query_block_size(
    num_queries: int, batch: int, heads: int, corners: int, head_dim: int, itemsize: int,
    budget_bytes: int = DEFAULT_BLOCK_BYTES,
) -> int:
    """Queries per block so that one block's gathered rows ``[B, H, block_q, K, Dh]`` fit ``budget_bytes``.

    At least 8 queries (the per-block overhead dominates below that), at most all of them.
    """
    per_query = batch * heads * corners * head_dim * itemsize
    return max(1, min(num_queries, max(_MIN_BLOCK_Q, budget_bytes // max(per_query, 1))))


def for_query_blocks(num_queries: int, block_q: int, body: Callable[[jax.Array | int, int, Carry], Carry],
                     carry: Carry) -> Carry:
    """Runs ``carry = body(start, size, carry)`` over ``[0, num_queries)`` in blocks of ``block_q``.

    Whole blocks run in a ``fori_loop`` (``start`` traced, ``size == block_q``); a shorter last
    block runs once after it with static ``start``/``size``, so nothing is padded or copied.
    """
    full = num_queries // block_q
    if full:
        carry = jax.lax.fori_loop(0, full, lambda i, c: body(i * block_q, block_q, c), carry)
    if full * block_q < num_queries:
        carry = body(full * block_q, num_queries - full * block_q, carry)
    return carry


def _rows_of(x: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _put_rows(buf: jax.Array, rows: jax.Array, start: jax.Array | int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buf, rows.astype(buf.dtype), start, axis=1)


def zero_after(dtype: jnp.dtype, *deps: jax.Array) -> jax.Array:
    """A scalar exactly 0 of ``dtype`` that XLA can compute only once every array in ``deps`` exists.

    Adding it to an input (or broadcasting it into a buffer) orders work that depends on nothing
    but the program's inputs: XLA's CPU scheduler runs such work up front and merges identical
    constant broadcasts (``optimization_barrier``'s control dependencies do not survive its
    passes). It is ``0 * sum(isnan(x[0]) for x in deps)``: the sum is finite, so the product is 0.
    """
    nans = sum(jnp.isnan(x.reshape(-1)[0]).astype(dtype) for x in deps)
    return nans * jnp.zeros((), dtype)


def loop_buffer(shape: tuple[int, ...], dtype: jnp.dtype, *like: jax.Array) -> jax.Array:
    """Zeros for a loop to fill, made only once the arrays ``like`` that the loop reads exist.

    * They vary over the same ``shard_map`` mesh axes as ``like`` (a loop carry must keep its
      type, and the blocks written into it vary like the inputs).
    * They are a broadcast of :func:`zero_after` ``(like)``, not of a constant: XLA merges
      identical constant broadcasts, and a program that runs several such loops in sequence
      (HIPIE's 6 encoder layers) then copies every loop's buffer out of the shared one up
      front, all alive at once (+340 MiB per layer at 8 prompts, 1024 px).
    """
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
    zeros = jnp.broadcast_to(zero_after(dtype, *like), shape)
    missing = axes - jax.typeof(zeros).manual_axis_type.varying
    return jax.lax.pcast(zeros, tuple(sorted(missing)), to="varying") if missing else zeros


def _block_q(value: jax.Array, sampling_locations: jax.Array, budget_bytes: int) -> int:
    batch, num_queries, heads, levels, points, _ = sampling_locations.shape
    return query_block_size(num_queries, batch, heads, levels * points * 4, value.shape[3],
                            jnp.dtype(value.dtype).itemsize, budget_bytes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _blocked(
    spatial_shapes: SpatialShapes,
    level_start_index: tuple[int, ...],
    budget_bytes: int,
    value: jax.Array,  # [B, S, H, Dh]
    sampling_locations: jax.Array,  # [B, Q, H, L, P, 2]
    attention_weights: jax.Array,  # [B, Q, H, L, P]
) -> jax.Array:  # [B, Q, H, Dh], value.dtype
    batch, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    acc_dtype = compute_dtype(value.dtype)

    def block(start, size, out):
        index, weight = head_major_samples(_rows_of(sampling_locations, start, size),
                                           _rows_of(attention_weights, start, size),
                                           spatial_shapes, level_start_index)  # [B, H, q, K]
        rows = gather_rows(value, index)  # [B, H, q, K, Dh]: the only big temporary
        return _put_rows(out, weighted_sum(weight, rows, acc_dtype), start)

    out = loop_buffer((batch, num_queries, heads, head_dim), value.dtype, value, sampling_locations, attention_weights)
    return for_query_blocks(num_queries, _block_q(value, sampling_locations, budget_bytes), block, out)


def _blocked_fwd(spatial_shapes, level_start_index, budget_bytes, value, sampling_locations, attention_weights):
    out = _blocked(spatial_shapes, level_start_index, budget_bytes, value, sampling_locations, attention_weights)
    return out, (value, sampling_locations, attention_weights)


def _blocked_bwd(spatial_shapes, level_start_index, budget_bytes, residuals, grad_out):
    value, sampling_locations, attention_weights = residuals
    num_queries = sampling_locations.shape[1]
    acc_dtype = compute_dtype(value.dtype)

    def block(start, size, carry):
        grad_value, grad_loc, grad_aw = carry
        loc, aw = _rows_of(sampling_locations, start, size), _rows_of(attention_weights, start, size)
        weight, pull_back, index = jax.vjp(  # [B, H, q, K] each
            lambda loc, aw: _weight_and_index(loc, aw, spatial_shapes, level_start_index), loc, aw, has_aux=True)
        dout = _rows_of(grad_out, start, size).transpose(0, 2, 1, 3).astype(acc_dtype)  # [B, H, q, Dh]
        rows = gather_rows(value, index)  # [B, H, q, K, Dh]
        grad_weight = jnp.einsum("bhqkd,bhqd->bhqk", rows, dout, preferred_element_type=acc_dtype)
        grad_value = _scatter_add_rows(grad_value, index, weight.astype(acc_dtype)[..., None] * dout[:, :, :, None, :])
        g_loc, g_aw = pull_back(grad_weight.astype(weight.dtype))
        return grad_value, _put_rows(grad_loc, g_loc, start), _put_rows(grad_aw, g_aw, start)

    like = (*residuals, grad_out)
    carry = (
        loop_buffer(value.shape, acc_dtype, *like),
        loop_buffer(sampling_locations.shape, sampling_locations.dtype, *like),
        loop_buffer(attention_weights.shape, attention_weights.dtype, *like),
    )
    grad_value, grad_loc, grad_aw = for_query_blocks(
        num_queries, _block_q(value, sampling_locations, budget_bytes), block, carry
    )
    return grad_value.astype(value.dtype), grad_loc, grad_aw


def _weight_and_index(loc, aw, spatial_shapes, level_start_index) -> tuple[jax.Array, jax.Array]:
    index, weight = head_major_samples(loc, aw, spatial_shapes, level_start_index)
    return weight, index


def _scatter_add_rows(grad_value: jax.Array, index: jax.Array, contrib: jax.Array) -> jax.Array:
    """``grad_value[b, index[b, h, q, k], h] += contrib[b, h, q, k]`` (duplicates accumulate).

    ``grad_value [B, S, H, Dh]`` is scattered through its free reshape ``[B, S*H, Dh]``, the
    transpose of :func:`gather_rows`.
    """
    batch, seq, heads, head_dim = grad_value.shape
    rows = index * heads + jnp.arange(heads, dtype=index.dtype)[:, None, None]  # [B, H, q, K]

    def one(g: jax.Array, idx: jax.Array, c: jax.Array) -> jax.Array:  # [S*H, Dh], [H, q, K], [H, q, K, Dh]
        return g.at[idx.reshape(-1)].add(c.reshape(-1, head_dim), mode="promise_in_bounds")

    flat = jax.vmap(one)(grad_value.reshape(batch, seq * heads, head_dim), rows, contrib)
    return flat.reshape(grad_value.shape)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def ms_deform_attn_xla(value: jax.Array, spatial_shapes: SpatialShapes, level_start_index: Sequence[int],
                       sampling_locations: jax.Array, attention_weights: jax.Array, *,
                       block_bytes: int | None = None) -> jax.Array:
    """MSDA in query blocks whose gathered rows fit ``block_bytes`` (forward and backward;
    default :func:`default_block_bytes`).

    Same arguments and result as ``reference.ms_deform_attn_dense``; temporaries are
    O(``block_bytes`` + the inputs) instead of O(B * Q * H * L * P * 4 * Dh).
    """
    batch, num_queries, heads = sampling_locations.shape[:3]
    budget = default_block_bytes() if block_bytes is None else int(block_bytes)
    out = _blocked(tuple(spatial_shapes), tuple(int(s) for s in level_start_index), budget,
                   value, sampling_locations, attention_weights)
    return out.reshape(batch, num_queries, heads * value.shape[3])
