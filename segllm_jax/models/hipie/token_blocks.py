"""Per-token work in blocks of image tokens, so its wide intermediates exist for one block at a time.

HIPIE's VL fusion and encoder FFN widen every image token to 2048 float32 features: at the 1024-px
frame (S = 21,760 tokens) with 8 prompts each such ``[B, S, 2048]`` tensor is 1.4 GB. Their work is
independent per token (the fusion's text side sums over tokens), so it runs here over blocks of the
token axis (axis 1 of every input):

* :func:`map_token_blocks` — ``fn(block) -> outputs`` per block, outputs put back along axis 1;
* :func:`sum_token_blocks` — ``sum over blocks of fn(block)`` (a reduction over the tokens).

The block size comes from a memory budget (:func:`token_block_size`), like the query blocks of
``pallas_kernels.ms_deform_attn`` (``impl="xla"``): the widest per-token intermediate of one block
fits ``budget_bytes``, so 8 prompts get blocks 8x shorter than one. The loop is the MSDA's
(``for_query_blocks``: whole blocks in a ``fori_loop`` reading and writing rows in place, a shorter
last block once after it); when one block covers every token ``fn`` runs once on the inputs as they
are (the unblocked computation).

Under autodiff each block is rematerialised (``jax.checkpoint``): the backward keeps only the blocks'
inputs and recomputes the wide intermediates block by block, so training memory is bounded too.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.ms_deform_attn.xla import default_block_bytes, for_query_blocks, loop_buffer

_MIN_BLOCK = 8

Tree = Any


def token_block_size(num_tokens: int, batch: int, features: int, budget_bytes: int | None = None) -> int:
    """Tokens per block so that one block's ``[batch, block, features]`` float32 intermediate fits
    ``budget_bytes``; at least 8 tokens, at most all of them. The default budget is the MSDA's
    (16 MiB on CPU, where such blocks stay in cache and the matmuls are still large; 256 MiB on
    GPU/TPU, where each iteration's kernels must stay large next to their launch overhead)."""
    budget = default_block_bytes() if budget_bytes is None else int(budget_bytes)
    per_token = batch * features * 4
    return max(1, min(num_tokens, max(_MIN_BLOCK, budget // max(per_token, 1))))


def _rows(x: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def map_token_blocks(fn: Callable[[Tree], Tree], xs: Tree, block: int) -> Tree:
    """``fn`` applied to blocks of ``block`` tokens (axis 1 of every leaf of ``xs``); its outputs, whose
    axis 1 is the block's tokens too, are written into buffers of the full length: the same result as
    ``fn(xs)`` for a per-token ``fn``."""
    num_tokens = jax.tree.leaves(xs)[0].shape[1]
    if block >= num_tokens:
        return fn(xs)
    fn = jax.checkpoint(fn, prevent_cse=False)
    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[:, :block], xs))
    inputs = jax.tree.leaves(xs)
    outs = jax.tree.map(lambda y: loop_buffer((y.shape[0], num_tokens, *y.shape[2:]), y.dtype, *inputs), shapes)

    def body(start, size, outs):
        ys = fn(jax.tree.map(lambda x: _rows(x, start, size), xs))
        return jax.tree.map(lambda o, y: jax.lax.dynamic_update_slice_in_dim(o, y, start, axis=1), outs, ys)

    return for_query_blocks(num_tokens, block, body, outs)


def sum_token_blocks(fn: Callable[[Tree], Tree], xs: Tree, block: int) -> Tree:
    """``sum over blocks of fn(block)`` for blocks of ``block`` tokens (axis 1 of every leaf of ``xs``):
    ``fn(xs)`` for an ``fn`` that sums over the tokens, up to float summation order."""
    num_tokens = jax.tree.leaves(xs)[0].shape[1]
    if block >= num_tokens:
        return fn(xs)
    fn = jax.checkpoint(fn, prevent_cse=False)
    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[:, :block], xs))

    def body(start, size, acc):
        return jax.tree.map(jnp.add, acc, fn(jax.tree.map(lambda x: _rows(x, start, size), xs)))

    return for_query_blocks(num_tokens, block, body, jax.tree.map(lambda y: jnp.zeros(y.shape, y.dtype), shapes))
