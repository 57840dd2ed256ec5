"""Image side of HIPIE: pixels -> backbone (once per image) -> per-prompt fusion + encoder memory.

``Hipie`` (model.py) subclasses :class:`HipieImageSide`, which owns the attributes ``backbone``,
``input_proj``, ``level_embed``, ``fusion`` and ``encoder`` (names fixed for the converter table
``segllm_jax_convert.hipie``), and calls, in this order:

1. ``feats = self.encode_image(pixels)`` — ``pixels`` [I, H, W, 3] normalised NHWC (see
   :func:`normalize_pixels`); runs the ResNet once per image (architecture.md §O16) -> :class:`BackboneFeatures`.
2. ``levels = self.prepare_levels(feats, pixel_mask=None)`` — prompt-independent (§O16): input
   projections (+ extra level from raw res5, §O15), sine positions + ``level_embed``, padding masks,
   valid ratios, flattening -> :class:`LevelInputs` (one row per image).
3. ``enc = self.encode_prompt(levels, prompts, image_index=None, lang_mask=None)`` — per prompt:
   gather the image rows by ``image_index`` [B] (identity when None), VL fusion with the prompt
   tokens [B, 8, 768], 6 deformable encoder layers -> :class:`EncoderOutput` with
   ``memory`` [B, S, 256], ``lang_fused`` [B, 8, 768] (what the class heads see, §O8),
   ``mask_flatten`` [B, S], ``valid_ratios`` [B, L, 2], ``lvl_pos`` [B, S, 256] and the static
   ``spatial_shapes`` / ``level_start_index``. ``encode_prompt`` also accepts the
   :class:`BackboneFeatures` directly (it then runs ``prepare_levels`` itself).

Parameter paths: ``backbone/...`` (resnet.py), ``input_proj/{0..3}/{conv,norm}/...``,
``level_embed/embedding`` [4, 256], ``fusion/...`` (fusion.py), ``encoder/layers/{i}/...``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from segllm_jax.config import HipieConfig
from segllm_jax.errors import InputError
from segllm_jax.models.hipie.encoder import (
    DeformableEncoder,
    SpatialShapes,
    flatten_levels,
    input_projections,
    level_masks,
    level_start_index,
    valid_ratios,
)
from segllm_jax.models.hipie.fusion import VLFusion
from segllm_jax.models.hipie.position import sine_position_embedding
from segllm_jax.models.hipie.resnet import BackboneFeatures, ResNet
from segllm_jax.models.layers import Embed


def normalize_pixels(images_u8: jax.Array, cfg: HipieConfig) -> jax.Array:
    """uint8 RGB [I, H, W, 3] -> float32 (x - mean) / std (§D5; padding becomes 'black')."""
    mean = jnp.asarray(cfg.pixel_mean, jnp.float32)
    std = jnp.asarray(cfg.pixel_std, jnp.float32)
    return (images_u8.astype(jnp.float32) - mean) / std


@struct.dataclass
class LevelInputs:
    """Prompt-independent encoder inputs, one row per image."""

    src_flatten: jax.Array  # [I, S, C] projected features (no position)
    lvl_pos: jax.Array  # [I, S, C] sine position + level_embed[l]
    mask_flatten: jax.Array  # [I, S] bool, True = padding
    valid_ratios: jax.Array  # [I, L, 2] (w, h)
    spatial_shapes: SpatialShapes = struct.field(pytree_node=False)

    @property
    def level_start_index(self) -> tuple[int, ...]:
        return level_start_index(self.spatial_shapes)


@struct.dataclass
class EncoderOutput:
    """Per-prompt encoder results (B = number of prompts)."""

    memory: jax.Array  # [B, S, C] output of the last encoder layer
    lang_fused: jax.Array  # [B, T, 768] prompt tokens after VL fusion
    lvl_pos: jax.Array  # [B, S, C]
    mask_flatten: jax.Array  # [B, S] bool
    valid_ratios: jax.Array  # [B, L, 2]
    src_flatten: jax.Array  # [B, S, C] encoder input before fusion
    vl_v: jax.Array  # [B, S, C] fused image tokens (input of encoder layer 0)
    memory_layers: tuple[jax.Array, ...] | None  # every layer's output when requested
    spatial_shapes: SpatialShapes = struct.field(pytree_node=False)

    @property
    def level_start_index(self) -> tuple[int, ...]:
        return level_start_index(self.spatial_shapes)


class HipieImageSide(nnx.Module):
    """backbone -> input_proj (+level_embed) -> VL fusion -> deformable encoder (§H3 to §H7)."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = ResNet(cfg, rngs=rngs)
        self.input_proj = input_projections(cfg, rngs=rngs)
        self.level_embed = Embed(cfg.num_feature_levels, cfg.d_model, axes=(None, "hipie_embed"), rngs=rngs,
                                 param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.fusion = VLFusion(cfg, rngs=rngs)
        self.encoder = DeformableEncoder(cfg, rngs=rngs)

    def encode_image(self, pixels: jax.Array) -> BackboneFeatures:
        """Normalised pixels [I, H, W, 3] (H, W multiples of 32) -> res3/res4/res5 NHWC."""
        h, w = pixels.shape[1:3]
        d = self.cfg.size_divisibility
        if h % d or w % d:
            raise InputError(f"HIPIE input is {h}x{w}; pad it (bottom/right) to multiples of {d} first "
                             "(SegLLM pads to 1024x1024).")
        return self.backbone(pixels)

    def prepare_levels(self, feats: BackboneFeatures, pixel_mask: jax.Array | None = None) -> LevelInputs:
        """Input projections, positions, masks and flattening; ``pixel_mask`` [I, H, W] True = padding."""
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats, strict=False)]  # input_proj[3]: below
        srcs.append(self.input_proj[3](feats.res5))  # extra level from the raw res5 map (§O15)
        shapes: SpatialShapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
        n = srcs[0].shape[0]
        if pixel_mask is None:
            masks = [jnp.zeros((n, h, w), bool) for h, w in shapes]
        else:
            masks = level_masks(pixel_mask, shapes)
        level_embed = self.level_embed.embedding[...].astype(jnp.float32)  # [L, C]
        pos = [sine_position_embedding(m, self.cfg.d_model // 2, self.cfg.pos_temperature) + level_embed[lvl]
               for lvl, m in enumerate(masks)]
        return LevelInputs(
            src_flatten=flatten_levels(srcs),
            lvl_pos=flatten_levels(pos).astype(self.cfg.dtype),
            mask_flatten=jnp.concatenate([m.reshape(n, -1) for m in masks], axis=1),
            valid_ratios=valid_ratios(masks),
            spatial_shapes=shapes,
        )

    def encode_prompt(self, levels: LevelInputs | BackboneFeatures, prompts: jax.Array,
                      image_index: jax.Array | None = None, lang_mask: jax.Array | None = None, *,
                      return_all_layers: bool = False, deterministic: bool = True,
                      rngs: nnx.Rngs | None = None,
                      fusion_dropout_keep: tuple[jax.Array, jax.Array] | None = None) -> EncoderOutput:
        """Per-prompt fusion + encoder. ``prompts`` [B, T, 768]; ``image_index`` [B] picks each
        prompt's image row (None: row b for prompt b); ``lang_mask`` [B, T] (None: all valid).
        Training: ``deterministic=False`` turns on the fusion's attention dropout, drawn from
        ``rngs`` or replayed from ``fusion_dropout_keep`` (see ``VLFusion``)."""
        if isinstance(levels, BackboneFeatures):
            levels = self.prepare_levels(levels)
        gather = (lambda a: a) if image_index is None else (lambda a: jnp.take(a, image_index, axis=0))
        src, lvl_pos = gather(levels.src_flatten), gather(levels.lvl_pos)
        mask, ratios = gather(levels.mask_flatten), gather(levels.valid_ratios)
        if src.shape[0] != prompts.shape[0]:
            raise ValueError(f"{prompts.shape[0]} prompts but {src.shape[0]} image rows; pass image_index")
        vl_v, lang_fused = self.fusion(src, prompts.astype(self.cfg.dtype), lang_mask,
                                       deterministic=deterministic, rngs=rngs, dropout_keep=fusion_dropout_keep)
        memory, layers = self.encoder(vl_v, lvl_pos, levels.spatial_shapes, ratios, mask, return_all=True)
        return EncoderOutput(memory=memory, lang_fused=lang_fused, lvl_pos=lvl_pos, mask_flatten=mask,
                             valid_ratios=ratios, src_flatten=src, vl_v=vl_v,
                             memory_layers=layers if return_all_layers else None,
                             spatial_shapes=levels.spatial_shapes)


__all__ = ["BackboneFeatures", "EncoderOutput", "HipieImageSide", "LevelInputs", "normalize_pixels"]
