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
from segllm_jax.models.hipie.token_blocks import map_token_blocks, sum_token_blocks, token_block_size
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
        self.block_bytes = cfg.token_block_bytes

    def __call__(self, v: jax.Array, lang: jax.Array, lang_mask: jax.Array | None = None, *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 dropout_keep: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
        """``dropout_keep`` = (keep_v [B, H, S, T], keep_l [B, H, T, S]) replaces the random draws in
        training mode: keep_v masks the text -> image probabilities (softmax over T), keep_l the
        image -> text ones (softmax over S). PyTorch's (B*H, S, T) / (B*H, T, S) layouts reshape to these.

        The image tokens are processed in blocks (``token_blocks``; ``block_bytes`` bounds a block's
        ``[B, block, vl_hidden]`` projections): pass 1 computes each block's logits and its text -> image
        update, pass 2, once the softmax over all S is known, sums the image -> text values block by block."""
        b, s, _ = v.shape
        t = lang.shape[1]
        h = self.num_heads
        a = self.attn
        e = a.v_proj.kernel.shape[1]
        hd = e // h
        v_hat = self.layer_norm_v(v)  # [B, S, C]
        l_hat = self.layer_norm_l(lang)  # [B, T, 768]
        k = a.l_proj(l_hat).astype(jnp.float32).reshape(b, t, h, hd)  # [B, T, H, hd]
        val_l = a.values_l_proj(l_hat).astype(jnp.float32).reshape(b, t, h, hd)
        if lang_mask is None:
            lang_mask = jnp.ones((b, t), jnp.float32)
        # text -> image: the language mask adds +1 (valid) / -9e15 (padding), §O7
        mask_term = jnp.where(lang_mask.astype(jnp.float32) == 0, -9e15, lang_mask.astype(jnp.float32))
        keep_v, keep_l = self._dropout_keep((b, h, s, t), deterministic, rngs, dropout_keep)
        block = token_block_size(s, b, e, self.block_bytes)

        def image_block(xs):  # v_hat [B, s, C] (+ keep_v [B, s, H, T]) -> v_out [B, s, C], logits [B, s, H, T]
            vb = xs[0]
            q = a.v_proj(vb).astype(jnp.float32) * (hd ** -0.5)
            q = q.reshape(*q.shape[:2], h, hd)  # [B, s, H, hd]
            logits = jnp.clip(jnp.einsum("bshd,bthd->bsht", q, k), -self.clamp, self.clamp)
            probs_v = jax.nn.softmax(logits + mask_term[:, None, None, :], axis=-1)  # over T
            if keep_v is not None:
                probs_v = probs_v * (xs[1] / (1.0 - self.dropout))
            out_v = jnp.einsum("bsht,bthd->bshd", probs_v, val_l).reshape(*vb.shape[:2], e)  # [B, s, 2048]
            delta_v = a.out_v_proj(out_v.astype(self.dtype)).astype(jnp.float32)
            v_out = vb.astype(jnp.float32) + self.gamma_v[...].astype(jnp.float32) * delta_v
            return v_out.astype(self.dtype), logits

        xs_v = (v_hat,) if keep_v is None else (v_hat, keep_v.transpose(0, 2, 1, 3))
        v_out, logits = map_token_blocks(image_block, xs_v, block)  # logits [B, S, H, T]

        # image -> text: softmax over the S image tokens (row max subtracted and clamped first)
        logits_l = logits - logits.max(1, keepdims=True)
        probs_l = jax.nn.softmax(jnp.clip(logits_l, -self.clamp, self.clamp), axis=1)  # [B, S, H, T]
        if keep_l is not None:
            probs_l = probs_l * (keep_l.transpose(0, 3, 1, 2) / (1.0 - self.dropout))

        def text_sum(xs):  # v_hat [B, s, C], probs_l [B, s, H, T] -> this block's share of out_l [B, T, H, hd]
            vb, pb = xs
            val_v = a.values_v_proj(vb).astype(jnp.float32).reshape(*vb.shape[:2], h, hd)
            return jnp.einsum("bsht,bshd->bthd", pb, val_v)

        out_l = sum_token_blocks(text_sum, (v_hat, probs_l), block).reshape(b, t, e)  # [B, T, 2048]
        delta_l = a.out_l_proj(out_l.astype(self.dtype)).astype(jnp.float32)
        l_out = l_hat.astype(jnp.float32) + self.gamma_l[...].astype(jnp.float32) * delta_l
        return v_out, l_out.astype(self.dtype)

    def _dropout_keep(self, shape_v: tuple[int, int, int, int], deterministic: bool, rngs: nnx.Rngs | None,
                      dropout_keep: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array | None, jax.Array | None]:
        """float32 keep masks (keep_v [B, H, S, T], keep_l [B, H, T, S]) in training mode, else (None, None)."""
        if deterministic or self.dropout <= 0.0:
            return None, None
        b, h, s, t = shape_v
        if dropout_keep is not None:
            return (dropout_keep[0].reshape(b, h, s, t).astype(jnp.float32),
                    dropout_keep[1].reshape(b, h, t, s).astype(jnp.float32))
        if rngs is None:
            raise ValueError("VLFusion in training mode (deterministic=False) needs rngs or dropout_keep "
                             "for its attention dropout.")
        keep = 1.0 - self.dropout
        keep_v = jax.random.bernoulli(rngs.dropout(), keep, (b, h, s, t)).astype(jnp.float32)
        keep_l = jax.random.bernoulli(rngs.dropout(), keep, (b, h, t, s)).astype(jnp.float32)
        return keep_v, keep_l
