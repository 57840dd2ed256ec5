"""What the two Pallas backends (``gpu.py``, ``tpu.py``) share: their interface and the sizes of a call.

Each backend module has ``forward(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights, *, block_q, ...)`` and ``backward(..., grad_out, *, block_q, ...)``, jitted with the
shapes and the block sizes static (:func:`kernel_jit`); ``api.py`` glues the two into a ``custom_vjp``.
Operands (the PyTorch op's layout):

* ``value``: ``[B, S, H, Dh]``, ``S = sum_l H_l * W_l`` (levels row-major, concatenated);
* ``spatial_shapes``: static ``((H_0, W_0), ...)``; ``level_start_index``: static exclusive prefix sums;
* ``sampling_locations``: ``[B, Q, H, L, P, 2]`` normalised (x, y); ``attention_weights``: ``[B, Q, H, L, P]``;
* ``grad_out`` and the forward's result: ``[B, Q, H, Dh]``; ``backward`` returns the gradients of
  ``value``, ``sampling_locations`` and ``attention_weights`` in their shapes and dtypes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax


class Sizes(NamedTuple):
    """The sizes of one call, from its operands."""

    batch: int  # B
    seq: int  # S
    heads: int  # H
    head_dim: int  # Dh
    num_queries: int  # Q
    levels: int  # L
    points: int  # P

    @classmethod
    def of(cls, value: jax.Array, sampling_locations: jax.Array) -> Sizes:
        batch, seq, heads, head_dim = value.shape
        _, num_queries, _, levels, points, _ = sampling_locations.shape
        return cls(batch, seq, heads, head_dim, num_queries, levels, points)


def kernel_jit(*block_names: str):
    """``jax.jit`` for a backend's ``forward`` / ``backward``: ``spatial_shapes``, ``level_start_index`` (the
    2nd and 3rd arguments) and the block-size keywords ``block_names`` are static."""
    return functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=block_names)
