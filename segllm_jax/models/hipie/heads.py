"""Prediction heads of HIPIE's decoder (architecture.md §H10): VL_Align class heads, box MLPs, IoU heads.

The original keeps ``class_embed`` / ``bbox_embed`` as *one* list of modules referenced both by
the detector (``detr.detr.class_embed``) and by the decoder (``transformer.decoder.class_embed``)
for box refinement and proposal scoring (§O12). Here they exist once, on ``Hipie``, and are passed
to the decoder and the two-stage selection as arguments: no shared references inside the module
graph, one parameter per checkpoint tensor.

Index layout (identical to the checkpoint):

* ``class_embed[0..dec_layers-1]``: :class:`VLAlign` (token logits against the fused prompt);
  ``class_embed[dec_layers]``: :class:`StillClassifier` (language-free proposal scorer, §O2 /
  STILL_CLS_FOR_ENCODER).
* ``bbox_embed[0..dec_layers-1]``: box refinement of decoder layer i (also the output box head);
  ``bbox_embed[dec_layers]``: two-stage proposal box regression.
* ``iou_head[0..dec_layers-1]``: IoU logit per layer (only the last is used at inference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.layers import Linear, param


class MLP(nnx.Module):
    """``num_layers`` Linears with ReLU between (DETR's ``MLP``); params ``layers/{i}/{kernel,bias}``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *, rngs: nnx.Rngs,
                 hidden_axis: str | None = "hipie_embed", in_axis: str | None = "hipie_embed",
                 out_axis: str | None = None, param_dtype: str = "float32", dtype: str = "float32"):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        axes = [in_axis] + [hidden_axis] * (num_layers - 1) + [out_axis]
        self.layers = nnx.List([
            Linear(dims[i], dims[i + 1], axes=(axes[i], axes[i + 1]), rngs=rngs,
                   param_dtype=param_dtype, dtype=dtype)
            for i in range(num_layers)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1:
                x = jax.nn.relu(x)
        return x


class VLAlign(nnx.Module):
    """Query x prompt-token logits (HIPIE ``VL_Align``; §O8).

    e = L2-normalise(tokens); t = Linear_768->256(e / 2); bias = e . bias_lang + bias0;
    logit = (hs . t^T) / exp(log_scale) + bias, clamped to +-50000. Output ``[B, Q, T]``.
    """

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.dot_product_projection_text = Linear(cfg.text_dim, cfg.d_model, axes=("hipie_text", "hipie_embed"), **kw)
        self.log_scale = param(rngs, nnx.initializers.zeros, (1,), (None,), cfg.param_dtype)
        self.bias_lang = param(rngs, nnx.initializers.zeros, (cfg.text_dim,), ("hipie_text",), cfg.param_dtype)
        # DYHEAD.PRIOR_PROB = 0.01 -> bias0 = -log(99) at a fresh start (converted weights overwrite it)
        self.bias0 = param(rngs, nnx.initializers.constant(-4.59511985013459), (1,), (None,), cfg.param_dtype)
        self.clamp = cfg.class_clamp

    def __call__(self, hs: jax.Array, tokens: jax.Array) -> jax.Array:
        tokens = tokens.astype(jnp.float32)  # [B, T, 768]
        norm = jnp.sqrt(jnp.sum(jnp.square(tokens), -1, keepdims=True))
        e = tokens / jnp.maximum(norm, 1e-12)  # F.normalize(p=2, eps=1e-12)
        proj = self.dot_product_projection_text(e / 2.0).astype(jnp.float32)  # [B, T, 256]
        bias = jnp.einsum("btc,c->bt", e, self.bias_lang[...].astype(jnp.float32)) + self.bias0[...][0]
        logit = jnp.einsum("bqc,btc->bqt", hs.astype(jnp.float32), proj) / jnp.exp(self.log_scale[...][0])
        logit = logit + bias[:, None, :]  # [B, Q, T]
        return jnp.clip(logit, -self.clamp, self.clamp)


class StillClassifier(nnx.Module):
    """Language-free proposal scorer (``class_embed[6]``): ``body`` Linear 256 -> 1."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        self.body = Linear(cfg.d_model, 1, axes=("hipie_embed", None), rngs=rngs,
                           param_dtype=cfg.param_dtype, dtype=cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.body(x)  # [..., 1]


def make_class_embed(cfg: HipieConfig, rngs: nnx.Rngs) -> nnx.List:
    """``dec_layers`` VLAlign heads followed by the proposal StillClassifier."""
    return nnx.List([VLAlign(cfg, rngs=rngs) for _ in range(cfg.dec_layers)] + [StillClassifier(cfg, rngs=rngs)])


def make_bbox_embed(cfg: HipieConfig, rngs: nnx.Rngs) -> nnx.List:
    """``dec_layers + 1`` box MLPs 256 -> 256 -> 256 -> 4 (refinement heads, then the proposal head)."""
    return nnx.List([
        MLP(cfg.d_model, cfg.d_model, 4, cfg.box_mlp_layers, rngs=rngs,
            param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        for _ in range(cfg.dec_layers + 1)
    ])


def make_iou_head(cfg: HipieConfig, rngs: nnx.Rngs) -> nnx.List:
    """``dec_layers`` IoU heads, Linear 256 -> 1 (USE_IOU_BRANCH)."""
    return nnx.List([
        Linear(cfg.d_model, 1, axes=("hipie_embed", None), rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        for _ in range(cfg.dec_layers)
    ])


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """HIPIE's ``inverse_sigmoid``: clamp to [0, 1], then log(max(x, eps) / max(1 - x, eps)).

    Keeps +-11.51 at exactly 0/1, so the +inf proposal logits of invalid tokens (§O5), which
    become reference 1.0 after the sigmoid, stay finite in the decoder.
    """
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


__all__ = ["MLP", "VLAlign", "StillClassifier", "make_class_embed", "make_bbox_embed", "make_iou_head",
           "inverse_sigmoid"]
