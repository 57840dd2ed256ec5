"""CLIP ViT vision tower, read at ``hidden_states[select_layer]`` (architecture.md §M2).

SegLLM takes layer -2 (the output of the second-to-last block, before any final LayerNorm):
patch tokens for the image (256 x 1024 at 224 px) and the CLS token for mask-encoding (§D6).
Only the blocks needed for the selected layer are built, so the converter lists the unused final
block(s), ``post_layernorm`` and ``visual_projection`` as ignored keys instead of loading them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from segllm_jax.config import VisionConfig
from segllm_jax.models.layers import LayerNorm, Linear, param


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class ClipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        d = cfg.hidden_size
        self.q_proj = Linear(d, d, axes=("vision_embed", "vision_heads"), **kw)
        self.k_proj = Linear(d, d, axes=("vision_embed", "vision_heads"), **kw)
        self.v_proj = Linear(d, d, axes=("vision_embed", "vision_heads"), **kw)
        self.out_proj = Linear(d, d, axes=("vision_heads", "vision_embed"), **kw)
        self.num_heads = cfg.num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = d // self.num_heads
        q = self.q_proj(x).reshape(b, t, self.num_heads, h)  # [B, T, N, H]
        k = self.k_proj(x).reshape(b, t, self.num_heads, h)
        v = self.v_proj(x).reshape(b, t, self.num_heads, h)
        scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * h ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, N, T, S]
        return self.out_proj(jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, d))


class ClipLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, axis_name="vision_embed", eps=cfg.layer_norm_eps, **kw)
        self.self_attn = ClipAttention(cfg, rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, axis_name="vision_embed", eps=cfg.layer_norm_eps, **kw)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("vision_mlp", "vision_embed"), **kw)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else jax.nn.gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class ClipVision(nnx.Module):
    """Pixels ``[B, H, W, 3]`` (CLIP-normalised) -> ``hidden_states[select_layer]`` ``[B, 1 + P, D]``."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.patch_embedding = param(rngs, nnx.initializers.lecun_normal(), (p, p, 3, d),
                                     ("conv_kernel", "conv_kernel", None, "vision_embed"), cfg.param_dtype)
        self.class_embedding = param(rngs, nnx.initializers.normal(0.02), (d,), ("vision_embed",), cfg.param_dtype)
        self.position_embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.num_patches + 1, d),
                                        ("position", "vision_embed"), cfg.param_dtype)
        self.pre_layrnorm = LayerNorm(d, axis_name="vision_embed", eps=cfg.layer_norm_eps, **kw)
        self.layers = nnx.List([ClipLayer(cfg, rngs) for _ in range(cfg.num_layers_run)])

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.hidden_states(pixels)[-1]

    def hidden_states(self, pixels: jax.Array) -> list[jax.Array]:
        """``hidden_states[0 .. select_layer]`` as transformers numbers them (0 = embeddings)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        patches = jax.lax.conv_general_dilated(
            pixels.astype(dtype), self.patch_embedding[...].astype(dtype),
            window_strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)  # [B, h, w, D]
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # [B, P, D]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(jnp.float32)
        states = [self.pre_layrnorm(x.astype(dtype))]  # hidden_states[0]
        for layer in self.layers:
            states.append(layer(states[-1]))
        return states  # each [B, 1 + P, D]; the last is hidden_states[select_layer]

    def patch_features(self, pixels: jax.Array) -> jax.Array:
        """Image features for the LLM: ``[B, P, D]`` (CLS dropped: select_feature='patch')."""
        hidden = self(pixels)
        return hidden[:, 1:] if self.cfg.select_feature == "patch" else hidden

    def cls_feature(self, pixels: jax.Array) -> jax.Array:
        """Mask-encode feature: CLS of the selected layer, ``[B, D]`` (no post-LN, no projection)."""
        return self(pixels)[:, 0]
