"""VL early-fusion block (GLIP ``BiAttentionBlockForCheckpoint`` as HIPIE uses it; architecture.md §H6, §O7).

Runs once, before encoder layer 0, between the flattened projected image tokens v [B, S, 256]
(no positional embedding) and the 8 prompt tokens l [B, 8, 768] that SegLLM injects instead of
BERT output. Both directions share one logit matrix A = (v_proj(v) / sqrt(head_dim)) k^T per head:

* image -> text (updates l): softmax of A^T over the S image tokens (row max subtracted and
  clamped first), no image padding mask;
* text -> image (updates v): A plus the language mask term (+1 for a valid token, -9e15 for a
  padded one, §O7), softmax over the text tokens.

Logits are clamped to +-50000 as in the original. Residuals are added to the *normalised* inputs
(pre-norm, §O7) through learned layer scales ``gamma_v`` / ``gamma_l``. Attention-probability
dropout (p = 0.1) exists only in training; with ``deterministic=True`` (eval) it is off. Training
can replay recorded dropout masks through ``dropout_keep`` (ATen semantics: x * keep / (1 - p)).

Parameter paths: ``layer_norm_v/{scale,bias}``, ``layer_norm_l/{scale,bias}``, ``gamma_v``,
``gamma_l``, ``attn/{v_proj,l_proj,values_v_proj,values_l_proj,out_v_proj,out_l_proj}/{kernel,bias}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.layers import LayerNorm, Linear, param


class BiMultiHeadAttention(nnx.Module):
    """The six projections of the bidirectional attention (``attn.*`` keys)."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        v, lang, e = cfg.d_model, cfg.text_dim, cfg.vl_hidden_dim
        self.v_proj = Linear(v, e, axes=("hipie_embed", "hipie_mlp"), **kw)
        self.l_proj = Linear(lang, e, axes=("hipie_text", "hipie_mlp"), **kw)
        self.values_v_proj = Linear(v, e, axes=("hipie_embed", "hipie_mlp"), **kw)
        self.values_l_proj = Linear(lang, e, axes=("hipie_text", "hipie_mlp"), **kw)
        self.out_v_proj = Linear(e, v, axes=("hipie_mlp", "hipie_embed"), **kw)
        self.out_l_proj = Linear(e, lang, axes=("hipie_mlp", "hipie_text"), **kw)


class VLFusion(nnx.Module):
    """``(v [B,S,C], l [B,T,768], lang_mask [B,T] | None) -> (v' [B,S,C], l' [B,T,768])``."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.layer_norm_v = LayerNorm(cfg.d_model, axis_name="hipie_embed", eps=cfg.layer_norm_eps, **kw)
        self.layer_norm_l = LayerNorm(cfg.text_dim, axis_name="hipie_text", eps=cfg.layer_norm_eps, **kw)
        self.attn = BiMultiHeadAttention(cfg, rngs=rngs)
        init_v = 1.0 / cfg.enc_layers  # original layer-scale init 1 / ENC_LAYERS
        self.gamma_v = param(rngs, nnx.initializers.constant(init_v), (cfg.d_model,), ("hipie_embed",),
                             cfg.param_dtype)
        self.gamma_l = param(rngs, nnx.initializers.constant(init_v), (cfg.text_dim,), ("hipie_text",),
                             cfg.param_dtype)
        self.num_heads = cfg.vl_heads
        self.clamp = cfg.vl_clamp
        self.dropout = cfg.vl_dropout
        self.dtype = cfg.dtype

    def __call__(self, v: jax.Array, lang: jax.Array, lang_mask: jax.Array | None = None, *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 dropout_keep: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
        """``dropout_keep`` = (keep_v [B, H, S, T], keep_l [B, H, T, S]) replaces the random draws in
        training mode: keep_v masks the text -> image probabilities (softmax over T), keep_l the
        image -> text ones (softmax over S). PyTorch's (B*H, S, T) / (B*H, T, S) layouts reshape to these."""
        b, s, _ = v.shape
        t = lang.shape[1]
        h = self.num_heads
        v_hat = self.layer_norm_v(v)  # [B, S, C]
        l_hat = self.layer_norm_l(lang)  # [B, T, 768]
        a = self.attn
        e = a.v_proj.kernel.shape[1]
        hd = e // h
        q = a.v_proj(v_hat).astype(jnp.float32) * (hd ** -0.5)
        q = q.reshape(b, s, h, hd)  # [B, S, H, hd]
        k = a.l_proj(l_hat).astype(jnp.float32).reshape(b, t, h, hd)  # [B, T, H, hd]
        val_v = a.values_v_proj(v_hat).astype(jnp.float32).reshape(b, s, h, hd)
        val_l = a.values_l_proj(l_hat).astype(jnp.float32).reshape(b, t, h, hd)

        logits = jnp.einsum("bshd,bthd->bhst", q, k)  # [B, H, S, T]
        logits = jnp.clip(logits, -self.clamp, self.clamp)

        # image -> text: softmax over the S image tokens
        logits_l = jnp.swapaxes(logits, -1, -2)  # [B, H, T, S]
        logits_l = logits_l - logits_l.max(-1, keepdims=True)
        logits_l = jnp.clip(logits_l, -self.clamp, self.clamp)
        probs_l = jax.nn.softmax(logits_l, axis=-1)

        # text -> image: the language mask adds +1 (valid) / -9e15 (padding), §O7
        if lang_mask is None:
            lang_mask = jnp.ones((b, t), jnp.float32)
        mask_term = jnp.where(lang_mask.astype(jnp.float32) == 0, -9e15, lang_mask.astype(jnp.float32))
        probs_v = jax.nn.softmax(logits + mask_term[:, None, None, :], axis=-1)  # [B, H, S, T]

        if not deterministic and self.dropout > 0.0:
            keep = 1.0 - self.dropout
            if dropout_keep is not None:
                keep_v = dropout_keep[0].reshape(probs_v.shape).astype(jnp.float32)
                keep_l = dropout_keep[1].reshape(probs_l.shape).astype(jnp.float32)
            elif rngs is not None:
                keep_v = jax.random.bernoulli(rngs.dropout(), keep, probs_v.shape).astype(jnp.float32)
                keep_l = jax.random.bernoulli(rngs.dropout(), keep, probs_l.shape).astype(jnp.float32)
            else:
                raise ValueError("VLFusion in training mode (deterministic=False) needs rngs or dropout_keep "
                                 "for its attention dropout.")
            probs_v = probs_v * (keep_v / keep)
            probs_l = probs_l * (keep_l / keep)

        out_v = jnp.einsum("bhst,bthd->bshd", probs_v, val_l).reshape(b, s, e)  # [B, S, 2048]
        out_l = jnp.einsum("bhts,bshd->bthd", probs_l, val_v).reshape(b, t, e)  # [B, T, 2048]
        delta_v = a.out_v_proj(out_v.astype(self.dtype)).astype(jnp.float32)
        delta_l = a.out_l_proj(out_l.astype(self.dtype)).astype(jnp.float32)
        v_out = v_hat.astype(jnp.float32) + self.gamma_v[...].astype(jnp.float32) * delta_v
        l_out = l_hat.astype(jnp.float32) + self.gamma_l[...].astype(jnp.float32) * delta_l
        return v_out.astype(self.dtype), l_out.astype(self.dtype)
