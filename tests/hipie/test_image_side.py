"""Unit tests of the image-side pieces that the golden files cannot reach (padding, masks, tiny shapes)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.encoder import encoder_reference_points, level_masks, nearest_resize_mask, valid_ratios
from segllm_jax.models.hipie.fusion import VLFusion
from segllm_jax.models.hipie.image_side import HipieImageSide, normalize_pixels
from segllm_jax.models.hipie.position import sine_box_embedding, sine_position_embedding

from .conftest import build_random


def _np_interleave(e, feats=128, temp=10000.0):
    k = np.arange(feats, dtype=np.float64)
    p = e[..., None] / temp ** (2 * (k // 2) / feats)
    out = np.empty_like(p)
    out[..., 0::2], out[..., 1::2] = np.sin(p[..., 0::2]), np.cos(p[..., 1::2])
    return out


def test_sine_position_embedding_with_padding_matches_float64() -> None:
    mask = np.zeros((2, 5, 7), bool)
    mask[1, 3:, :] = True
    mask[1, :, 5:] = True
    got = np.asarray(sine_position_embedding(jnp.asarray(mask)))
    nm = (~mask).astype(np.float64)
    y, x = nm.cumsum(1), nm.cumsum(2)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    want = np.concatenate([_np_interleave(y), _np_interleave(x)], -1)
    assert got.shape == (2, 5, 7, 256)
    # padded columns have a zero cumulative sum, i.e. angles of ~1e6 rad whose float32 sine is
    # noise in the original too; compare the valid positions (the ones attention reads)
    np.testing.assert_allclose(got[~mask], want[~mask], atol=2e-6)


def test_sine_box_embedding_order_y_x_w_h() -> None:
    boxes = np.random.default_rng(0).uniform(size=(3, 4))
    got = np.asarray(sine_box_embedding(jnp.asarray(boxes, jnp.float32)))
    s = 2 * math.pi
    want = np.concatenate([_np_interleave(boxes[:, i] * s) for i in (1, 0, 2, 3)], -1)
    np.testing.assert_allclose(got, want, atol=2e-6)
    got2 = np.asarray(sine_box_embedding(jnp.asarray(boxes[:, :2], jnp.float32)))
    np.testing.assert_allclose(got2, want[:, :256], atol=2e-6)


def test_masks_ratios_and_reference_points() -> None:
    pix = np.zeros((1, 64, 64), bool)
    pix[:, :, 48:] = True  # right quarter padded
    shapes = ((8, 8), (4, 4), (2, 2), (1, 1))
    masks = level_masks(jnp.asarray(pix), shapes)
    assert [m.shape for m in masks] == [(1, h, w) for h, w in shapes]
    np.testing.assert_array_equal(np.asarray(masks[0])[0, 0], [False] * 6 + [True] * 2)
    torch = pytest.importorskip("torch")
    odd = np.random.default_rng(0).uniform(size=(2, 13, 17)) < 0.5
    for size in ((5, 7), (4, 9), (13, 17)):
        want = torch.nn.functional.interpolate(torch.from_numpy(odd)[None].float(), size=size).bool()[0].numpy()
        np.testing.assert_array_equal(np.asarray(nearest_resize_mask(jnp.asarray(odd), size)), want)
    ratios = np.asarray(valid_ratios(masks))
    np.testing.assert_allclose(ratios[0, :, 1], 1.0)
    np.testing.assert_allclose(ratios[0, :, 0], [0.75, 0.75, 1.0, 1.0])  # nearest picks cols 0, 32 at 2x2
    ref = np.asarray(encoder_reference_points(shapes, jnp.ones((1, 4, 2))))
    assert ref.shape == (1, 85, 4, 2)
    np.testing.assert_allclose(ref[0, 1, 0], [1.5 / 8, 0.5 / 8])  # token (i=0, j=1) of level 0: (x, y)
    np.testing.assert_allclose(ref[0, 64 + 4, 3], [0.5 / 4, 1.5 / 4])  # level 1 token (1, 0)


def _np_fusion(f: VLFusion, v, lang, mask, keep=None):
    """float64 transcription of architecture.md §H6 (per head, with the +1 / -9e15 language mask term)."""
    g = lambda x: np.asarray(x[...], np.float64)  # noqa: E731

    def ln(x, m):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g(m.scale) + g(m.bias)

    def lin(x, m):
        return x @ g(m.kernel) + g(m.bias)

    a, h = f.attn, f.num_heads
    vh, lh = ln(v, f.layer_norm_v), ln(lang, f.layer_norm_l)
    e = a.v_proj.kernel.shape[1]
    hd = e // h
    b, s, t = v.shape[0], v.shape[1], lang.shape[1]
    q = (lin(vh, a.v_proj) * hd ** -0.5).reshape(b, s, h, hd)
    k = lin(lh, a.l_proj).reshape(b, t, h, hd)
    vv = lin(vh, a.values_v_proj).reshape(b, s, h, hd)
    vl = lin(lh, a.values_l_proj).reshape(b, t, h, hd)
    logit = np.einsum("bshd,bthd->bhst", q, k)
    lt = np.swapaxes(logit, -1, -2)
    pl = np.exp(lt - lt.max(-1, keepdims=True))
    pl /= pl.sum(-1, keepdims=True)
    lv = logit + np.where(mask == 0, -9e15, mask)[:, None, None, :]
    pv = np.exp(lv - lv.max(-1, keepdims=True))
    pv /= pv.sum(-1, keepdims=True)
    if keep is not None:
        pv, pl = pv * keep[0] / 0.9, pl * keep[1] / 0.9
    ov = lin(np.einsum("bhst,bthd->bshd", pv, vl).reshape(b, s, e), a.out_v_proj)
    ol = lin(np.einsum("bhts,bshd->bthd", pl, vv).reshape(b, t, e), a.out_l_proj)
    return vh + g(f.gamma_v) * ov, lh + g(f.gamma_l) * ol


def test_fusion_matches_float64_with_padded_language_tokens() -> None:
    cfg = HipieConfig.tiny()
    f = build_random(lambda: VLFusion(cfg, rngs=nnx.Rngs(3)), seed=3)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 11, cfg.d_model))
    lang = rng.normal(size=(2, cfg.prompt_tokens, cfg.text_dim))
    mask = np.ones((2, cfg.prompt_tokens))
    mask[1, 5:] = 0
    got_v, got_l = f(jnp.asarray(v, jnp.float32), jnp.asarray(lang, jnp.float32), jnp.asarray(mask))
    want_v, want_l = _np_fusion(f, v, lang, mask)
    np.testing.assert_allclose(np.asarray(got_v), want_v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_l), want_l, rtol=1e-5, atol=1e-5)
    # a padded token cannot influence the image tokens
    lang2 = lang.copy()
    lang2[1, 6] += 10.0
    got_v2, _ = f(jnp.asarray(v, jnp.float32), jnp.asarray(lang2, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got_v2)[1], np.asarray(got_v)[1], atol=1e-6)


def test_fusion_dropout_only_in_training() -> None:
    cfg = HipieConfig.tiny()
    f = build_random(lambda: VLFusion(cfg, rngs=nnx.Rngs(0)))
    v = jnp.ones((1, 5, cfg.d_model)) * jnp.arange(cfg.d_model)
    lang = jnp.ones((1, cfg.prompt_tokens, cfg.text_dim)) * jnp.arange(cfg.text_dim) / cfg.text_dim
    a = f(v, lang)
    b = f(v, lang, deterministic=True)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    c = f(v, lang, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(np.asarray(a[1]), np.asarray(c[1]))
    # recorded masks (training golden replay) follow ATen: probs * keep / 0.9
    rng = np.random.default_rng(5)
    h, s, t = cfg.vl_heads, v.shape[1], cfg.prompt_tokens
    keep = (rng.uniform(size=(1, h, s, t)) < 0.9, rng.uniform(size=(1, h, t, s)) < 0.9)
    got_v, got_l = f(v, lang, deterministic=False, dropout_keep=tuple(jnp.asarray(k) for k in keep))
    want_v, want_l = _np_fusion(f, np.asarray(v, np.float64), np.asarray(lang, np.float64),
                                np.ones((1, t)), keep=keep)
    np.testing.assert_allclose(np.asarray(got_v), want_v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_l), want_l, rtol=1e-5, atol=1e-5)


def test_tiny_image_side_end_to_end() -> None:
    """Two images, three prompts gathered by image index, one image with a padded right side."""
    cfg = HipieConfig.tiny()
    model = build_random(lambda: HipieImageSide(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    pixels = normalize_pixels(jnp.asarray(rng.integers(0, 256, size=(2, 64, 96, 3)), jnp.uint8), cfg)
    prompts = jnp.asarray(rng.normal(size=(3, cfg.prompt_tokens, cfg.text_dim)), jnp.float32)
    index = jnp.asarray([1, 0, 1], jnp.int32)
    pad = np.zeros((2, 64, 96), bool)
    pad[1, :, 64:] = True

    @nnx.jit
    def run(m, px, pr, idx, pm):
        levels = m.prepare_levels(m.encode_image(px), pm)
        return levels, m.encode_prompt(levels, pr, idx)

    levels, enc = run(model, pixels, prompts, index, jnp.asarray(pad))
    shapes = ((8, 12), (4, 6), (2, 3), (1, 2))
    s = sum(h * w for h, w in shapes)
    assert enc.spatial_shapes == shapes and enc.level_start_index == (0, 96, 120, 126)
    assert enc.memory.shape == (3, s, cfg.d_model) and enc.lang_fused.shape == (3, cfg.prompt_tokens, cfg.text_dim)
    assert np.isfinite(np.asarray(enc.memory)).all()
    np.testing.assert_array_equal(np.asarray(enc.mask_flatten), np.asarray(levels.mask_flatten)[[1, 0, 1]])
    np.testing.assert_allclose(np.asarray(enc.valid_ratios)[0, :3, 0], [8 / 12, 4 / 6, 2 / 3], rtol=1e-6)
    # per-prompt gathering is the same as running each prompt on its own image row
    _, solo = run(model, pixels, prompts[jnp.asarray([2, 2, 2])], jnp.asarray([1, 1, 1], jnp.int32),
                  jnp.asarray(pad))  # same shapes: no recompilation
    np.testing.assert_allclose(np.asarray(enc.memory[2]), np.asarray(solo.memory[0]), rtol=1e-5, atol=1e-5)
    # gradients reach the prompt (SegLLM trains through it) and are finite
    grad = nnx.jit(lambda m, p: jax.grad(lambda q: m.encode_prompt(levels, q, index).memory.sum())(p))(
        model, prompts)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
