"""The VL fusion and encoder FFN over blocks of image tokens equal the unblocked computation.

``token_block_bytes=1`` forces the smallest blocks (8 tokens: several full blocks plus a shorter last
one); ``2**40`` makes one block cover every token (the plain, unblocked expressions). Forward and
gradients (parameters and inputs) must agree to 1e-6 relative: only float summation order differs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.encoder import DeformableEncoder
from segllm_jax.models.hipie.fusion import VLFusion
from segllm_jax.models.hipie.token_blocks import map_token_blocks, sum_token_blocks, token_block_size

from .conftest import build_random

TINY_BLOCKS, ONE_BLOCK = 1, 2**40
SHAPES = ((6, 8), (3, 4), (2, 2), (1, 1))  # S = 65 = 8 blocks of 8 + 1


def _blocked_and_whole(module_cls, seed: int):
    """The same random module twice: with the tiniest token blocks, and with one block for all tokens."""
    def build(block_bytes: int):
        cfg = dataclasses.replace(HipieConfig.tiny(), token_block_bytes=block_bytes)
        return build_random(lambda: module_cls(cfg, rngs=nnx.Rngs(0)), seed=seed)

    return build(TINY_BLOCKS), build(ONE_BLOCK)


def _assert_close(got, want, rel: float = 1e-6) -> None:
    """max |got - want| / max |want| <= rel for every leaf; prints the worst."""
    errs = {}
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, jax.tree_util.keystr(path)
        errs[jax.tree_util.keystr(path)] = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
    worst = max(errs, key=errs.get)
    print(f"worst relative error {errs[worst]:.2e} at {worst} ({len(errs)} arrays)")
    assert errs[worst] <= rel, f"{worst}: relative error {errs[worst]:.2e}"


def _grads(model, loss, *inputs):
    return nnx.jit(nnx.grad(loss, argnums=tuple(range(len(inputs) + 1))))(model, *inputs)


def test_block_size_from_budget() -> None:
    assert token_block_size(21760, 8, 2048, 16 * 2**20) == 256
    assert token_block_size(21760, 1, 2048, 16 * 2**20) == 2048
    assert token_block_size(100, 8, 2048, 1) == 8  # at least 8 tokens
    assert token_block_size(5, 8, 2048, 1) == 5  # at most all of them


def test_fusion_blocked_equals_unblocked_forward_and_grad() -> None:
    blocked, whole = _blocked_and_whole(VLFusion, seed=4)
    cfg = HipieConfig.tiny()
    rng = np.random.default_rng(0)
    b, s, t, h = 2, 65, cfg.prompt_tokens, cfg.vl_heads
    assert token_block_size(s, b, cfg.vl_hidden_dim, TINY_BLOCKS) == 8
    v = jnp.asarray(rng.normal(size=(b, s, cfg.d_model)), jnp.float32)
    lang = jnp.asarray(rng.normal(size=(b, t, cfg.text_dim)), jnp.float32)
    mask = np.ones((b, t), np.float32)
    mask[1, 5:] = 0
    keep = tuple(jnp.asarray(rng.uniform(size=shape) < 0.9) for shape in ((b, h, s, t), (b, h, t, s)))

    fwd = nnx.jit(lambda f, v, lang: f(v, lang, jnp.asarray(mask)))
    _assert_close(fwd(blocked, v, lang), fwd(whole, v, lang))

    def loss(f, v, lang):  # training mode, recorded dropout masks
        out_v, out_l = f(v, lang, jnp.asarray(mask), deterministic=False, dropout_keep=keep)
        return jnp.sum(out_v * jnp.cos(out_v)) + jnp.sum(out_l ** 2)

    _assert_close(_grads(blocked, loss, v, lang), _grads(whole, loss, v, lang))


def test_encoder_blocked_equals_unblocked_forward_and_grad() -> None:
    blocked, whole = _blocked_and_whole(DeformableEncoder, seed=5)
    cfg = HipieConfig.tiny()
    rng = np.random.default_rng(1)
    b, s = 2, sum(hh * ww for hh, ww in SHAPES)
    assert token_block_size(s, b, cfg.ffn_dim, TINY_BLOCKS) == 8
    x = jnp.asarray(rng.normal(size=(b, s, cfg.d_model)), jnp.float32)
    pos = jnp.asarray(rng.normal(size=(b, s, cfg.d_model)), jnp.float32)
    ratios = jnp.ones((b, len(SHAPES), 2), jnp.float32)

    fwd = nnx.jit(lambda enc, x, pos: enc(x, pos, SHAPES, ratios))
    _assert_close(fwd(blocked, x, pos), fwd(whole, x, pos))

    def loss(enc, x, pos):
        return jnp.sum(jnp.sin(enc(x, pos, SHAPES, ratios)))

    _assert_close(_grads(blocked, loss, x, pos), _grads(whole, loss, x, pos))


def test_helpers_and_training_memory() -> None:
    """``map_token_blocks`` / ``sum_token_blocks`` equal the plain call, and under ``grad`` the blocked
    MLP keeps no [B, S, hidden] tensor (each block is rematerialised)."""
    rng = np.random.default_rng(2)
    b, s, c, hidden = 2, 4100, 16, 1024
    w1 = jnp.asarray(rng.normal(size=(c, hidden)) / 4, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(hidden, c)) / 32, jnp.float32)
    x = jnp.asarray(rng.normal(size=(b, s, c)), jnp.float32)

    def mlp(w1, w2, x):
        return jax.nn.relu(x @ w1) @ w2

    def mlp_sum(xs):
        return jnp.einsum("bsc,bsd->bcd", xs[0], xs[1])

    block = token_block_size(s, b, hidden, 2**20)  # 128 tokens: 32 blocks + 4
    assert block == 128
    _assert_close(map_token_blocks(lambda xs: mlp(w1, w2, xs), x, block), mlp(w1, w2, x))
    _assert_close(sum_token_blocks(mlp_sum, (x, x * 2), block), mlp_sum((x, x * 2)))

    def loss(w1, w2, x, block):
        return jnp.sum(map_token_blocks(lambda xs: mlp(w1, w2, xs), x, block) ** 2)

    hidden_bytes = b * s * hidden * 4  # 33.6 MB
    temps = {}
    for name, blk in (("blocked", block), ("whole", s)):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
        temps[name] = grad.lower(w1, w2, x, blk).compile().memory_analysis().temp_size_in_bytes
        if name == "blocked":
            got = grad(w1, w2, x, blk)
        else:
            _assert_close(got, grad(w1, w2, x, blk), rel=2e-6)
    assert temps["whole"] >= hidden_bytes
    assert temps["blocked"] < hidden_bytes / 4, temps
