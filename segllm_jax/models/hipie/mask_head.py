"""CondInst mask branch of HIPIE (architecture.md §H11 to §H13; §O9, §O10, §O11).

* :class:`MaskHeadSmallConv` (``detr.mask_head``): a small top-down conv path over the encoder
  memory of levels 0-2 -> 8-channel ``mask_feats`` at stride 8 (no normalisation; nearest 2x
  upsampling between levels).
* ``controller`` (an MLP on ``Hipie``) turns each query's last hidden state into 169 numbers:
  the weights of a 3-layer 1x1-conv network (:func:`dynamic_mask_logits`) that is run on
  [relative coords (2) ; mask_feats (8)] at every stride-8 pixel.
* :func:`aligned_bilinear` (x2, stride 8 -> 4) and :func:`upsample_to_image` (x4 bilinear,
  ``align_corners=False``, stride 4 -> 1) finish the chain; the final mask is ``sigmoid > 0.5``.

The dynamic conv of one query depends only on that query's parameters and reference point, so
computing it for the selected query alone gives bit-for-bit the same logits as computing all 110
and indexing (§H2): inference does that (``Hipie.selected_mask``); tests run all queries.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.conv import Conv2d


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(mode="nearest")`` on NHWC: source index ``floor(dst * in / out)`` (§O11).

    For the integer factors HIPIE uses this is plain repetition.
    """
    _, h, w, _ = x.shape
    oh, ow = size
    if oh % h == 0 and ow % w == 0:
        return jnp.repeat(jnp.repeat(x, oh // h, axis=1), ow // w, axis=2)
    iy = np.minimum(np.floor(np.arange(oh, dtype=np.float32) * np.float32(h / oh)).astype(np.int64), h - 1)
    ix = np.minimum(np.floor(np.arange(ow, dtype=np.float32) * np.float32(w / ow)).astype(np.int64), w - 1)
    return x[:, iy][:, :, ix]


class MaskHeadSmallConv(nnx.Module):
    """``MaskHeadSmallConv(256, None, 256)`` with ``fpns=None`` (§H11). NHWC in and out.

    x = relu(lay3(f2)); x = relu(lay4(f1 + up(x))); x = relu(jia_dcn(f0 + up(x)));
    x = relu(lay1(x)); mask_feats = relu(lay2(x)). ``jia_dcn`` is a plain 3x3 conv despite its name.
    """

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        if cfg.mask_head_hidden != cfg.d_model:
            raise ValueError(f"mask_head_hidden={cfg.mask_head_hidden} must equal d_model={cfg.d_model}: "
                             "the head adds encoder maps to its own activations")
        kw = dict(padding=1, rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        hid = cfg.mask_head_hidden
        self.lay3 = Conv2d(cfg.d_model, hid, 3, **kw)
        self.lay4 = Conv2d(hid, hid, 3, **kw)
        self.jia_dcn = Conv2d(hid, hid, 3, **kw)
        self.lay1 = Conv2d(hid, cfg.mask_head_mid, 3, **kw)
        self.lay2 = Conv2d(cfg.mask_head_mid, cfg.mask_feat_channels, 3, **kw)

    def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
        """``feats`` = [f0 (stride 8), f1 (16), f2 (32)], each [B, H_l, W_l, C] -> [B, H0, W0, 8]."""
        f0, f1, f2 = feats
        x = jax.nn.relu(self.lay3(f2))
        x = jax.nn.relu(self.lay4(f1 + nearest_resize(x, f1.shape[1:3])))
        x = jax.nn.relu(self.jia_dcn(f0 + nearest_resize(x, f0.shape[1:3])))
        x = jax.nn.relu(self.lay1(x))
        return jax.nn.relu(self.lay2(x))


def split_memory_levels(memory: jax.Array, spatial_shapes: Sequence[tuple[int, int]], n: int = 3) -> list[jax.Array]:
    """Flattened encoder memory [B, S, C] -> the first ``n`` levels as NHWC maps (row-major tokens)."""
    b, _, c = memory.shape
    out, start = [], 0
    for h, w in spatial_shapes[:n]:
        out.append(memory[:, start:start + h * w].reshape(b, h, w, c))
        start += h * w
    return out


def dynamic_param_split(cfg: HipieConfig) -> tuple[list[int], list[int]]:
    """Sizes of (w0, w1, ..., b0, b1, ...) inside the controller output (80, 64, 8 | 8, 8, 1 for SegLLM)."""
    d, n = cfg.dynamic_channels, cfg.controller_layers
    in0 = cfg.mask_feat_channels + (2 if cfg.use_rel_coords else 0)
    w = [in0 * d] + [d * d] * (n - 2) + [d]
    b = [d] * (n - 1) + [1]
    return w, b


def mask_locations(h: int, w: int, stride: int) -> jax.Array:
    """Pixel (x, y) of every stride-``stride`` cell: ``(stride*j + stride//2, stride*i + stride//2)``; [H, W, 2]."""
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) * stride, np.arange(w, dtype=np.float32) * stride,
                         indexing="ij")
    return jnp.asarray(np.stack([xs, ys], -1) + np.float32(stride // 2))


def dynamic_mask_logits(cfg: HipieConfig, mask_feats: jax.Array, ref_px: jax.Array, params: jax.Array) -> jax.Array:
    """Per-query dynamic 1x1-conv network (§H12) -> stride-8 logits [B, Q, H, W].

    ``mask_feats`` [B, H, W, 8]; ``ref_px`` [B, Q, 2] reference centre in pixels (§O9: the centre of
    the box *entering* the last decoder layer); ``params`` [B, Q, 169]. The input per pixel is
    [ref - loc (x, y), raw pixels, not normalised ; 8 features], coordinates first.
    """
    b, h, w, c = mask_feats.shape
    q = params.shape[1]
    d, n = cfg.dynamic_channels, cfg.controller_layers
    wsz, bsz = dynamic_param_split(cfg)
    chunks = jnp.split(params.astype(jnp.float32), np.cumsum(wsz + bsz)[:-1].tolist(), axis=-1)
    weights, biases = chunks[:n], chunks[n:]
    feats = jnp.broadcast_to(mask_feats.astype(jnp.float32)[:, None], (b, q, h, w, c))
    if cfg.use_rel_coords:
        loc = mask_locations(h, w, cfg.mask_feat_stride)  # [H, W, 2]
        rel = ref_px.astype(jnp.float32)[:, :, None, None, :] - loc  # [B, Q, H, W, 2]
        x = jnp.concatenate([rel, feats], axis=-1)
    else:
        x = feats
    for i in range(n):
        out_ch = d if i < n - 1 else 1
        wi = weights[i].reshape(b, q, out_ch, -1)  # output-major, like conv weight [out, in, 1, 1]
        x = jnp.einsum("bqhwi,bqoi->bqhwo", x, wi) + biases[i][:, :, None, None, :]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x[..., 0]


def aligned_bilinear(x: jax.Array, factor: int) -> jax.Array:
    """CondInst ``aligned_bilinear`` on [..., h, w] (§O10).

    Replicate-pad one pixel right/bottom, bilinear resize with ``align_corners=True`` to
    (f*h + 1, f*w + 1), replicate-pad f//2 pixels left/top, keep the first f*h rows / f*w columns.
    The align_corners step is written out (PyTorch's source index ``dst * (in-1)/(out-1)``,
    weights combined as h0*(w0*x00 + w1*x01) + h1*(w0*x10 + w1*x11)).
    """
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = jnp.concatenate([x, x[..., -1:, :]], axis=-2)
    x = jnp.concatenate([x, x[..., :, -1:]], axis=-1)  # [..., h+1, w+1]
    oh, ow = factor * h + 1, factor * w + 1

    def axis_weights(n_in: int, n_out: int):
        scale = np.float32(n_in - 1) / np.float32(n_out - 1)
        src = np.arange(n_out, dtype=np.float32) * scale
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam1 = (src - i0.astype(np.float32)).astype(np.float32)
        return i0, i1, np.float32(1.0) - lam1, lam1

    y0, y1, hy0, hy1 = axis_weights(h + 1, oh)
    x0, x1, wx0, wx1 = axis_weights(w + 1, ow)
    r0, r1 = x[..., y0, :], x[..., y1, :]  # [..., oh, w+1]

    def horiz(r):
        return jnp.asarray(wx0) * r[..., x0] + jnp.asarray(wx1) * r[..., x1]  # [..., oh, ow]

    up = jnp.asarray(hy0)[:, None] * horiz(r0) + jnp.asarray(hy1)[:, None] * horiz(r1)
    p = factor // 2
    up = jnp.concatenate([jnp.repeat(up[..., :1, :], p, axis=-2), up], axis=-2)
    up = jnp.concatenate([jnp.repeat(up[..., :, :1], p, axis=-1), up], axis=-1)
    return up[..., :oh - 1, :ow - 1]


def upsample_to_image(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of [..., h, w] logits to ``size`` with half-pixel centres (``align_corners=False``).

    For upsampling ``jax.image.resize`` equals PyTorch's ``F.interpolate(mode="bilinear")``
    including the borders (§O10).
    """
    return jax.image.resize(logits.astype(jnp.float32), logits.shape[:-2] + tuple(size), method="bilinear")


def binarize(logits: jax.Array, threshold: float = 0.5) -> jax.Array:
    """``sigmoid(logits) > threshold`` (HIPIE's MASK_THRES), evaluated as the original does."""
    return jax.nn.sigmoid(logits) > threshold
