"""``Hipie``: the whole HIPIE segmentor as SegLLM uses it (architecture.md §H2).

Attribute names are fixed (the converter table ``segllm_jax_convert.hipie`` targets them):
``backbone``, ``input_proj``, ``level_embed``, ``fusion``, ``encoder`` (image side,
:class:`~segllm_jax.models.hipie.image_side.HipieImageSide`), ``decoder`` (two-stage selection +
decoder layers), ``class_embed``, ``bbox_embed``, ``iou_head`` (per-layer heads, each tensor
once; §O12), ``mask_head`` and ``controller`` (CondInst branch).

Inference, split where the work naturally splits (§O16, §H2):

1. ``image_features(images_u8)`` once per image: on-device normalisation, ResNet-50, input
   projections, positions -> :class:`LevelInputs` (prompt-independent).
2. ``segment(levels, prompts [B, 8, 768], image_index [B])`` per prompt: VL fusion, encoder,
   two-stage selection, decoder, last-layer heads, controller parameters and the pixel branch
   -> :class:`HipieOutputs`. No per-query mask is computed here.
3. host: :func:`~segllm_jax.models.hipie.postprocess.select_targets` (NMS, top-k, SegLLM's
   target-class choice) on ``pred_logits`` / ``pred_boxes`` / ``pred_iou``.
4. ``selected_mask(outputs, sel_query)`` on device: dynamic conv, ``aligned_bilinear`` and the x4
   upsampling for the chosen query only (identical to computing all 110 and indexing).

:func:`predict` runs 1-4 with jitted device steps. ``all_pred_masks`` gives every query's
stride-4 logits (the original's ``pred_masks``) for tests.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.decoder import HipieDecoder
from segllm_jax.models.hipie.heads import MLP, make_bbox_embed, make_class_embed, make_iou_head
from segllm_jax.models.hipie.image_side import EncoderOutput, HipieImageSide, LevelInputs, normalize_pixels
from segllm_jax.models.hipie.mask_head import (
    MaskHeadSmallConv,
    aligned_bilinear,
    binarize,
    dynamic_mask_logits,
    split_memory_levels,
    upsample_to_image,
)
from segllm_jax.models.hipie.postprocess import Selection, select_targets


@struct.dataclass
class HipieOutputs:
    """Per-prompt results of :meth:`Hipie.segment` (B prompts, Q = bg + fg queries, S tokens)."""

    lang_fused: jax.Array  # [B, T, 768] prompt tokens after VL fusion
    memory: jax.Array  # [B, S, C] final encoder memory
    enc_scores: jax.Array  # [B, S] proposal logits
    enc_coord_unact: jax.Array  # [B, S, 4] proposal box logits (+inf = invalid, §O5)
    topk_indices: jax.Array  # [B, K] int32 token indices, descending score
    topk_scores: jax.Array  # [B, K]
    init_reference: jax.Array  # [B, Q, 4]
    hs: jax.Array  # [n_dec, B, Q, C]
    inter_references: jax.Array  # [n_dec, B, Q, 4]
    pred_logits: jax.Array  # [B, Q, T] token logits of the last layer
    pred_boxes: jax.Array  # [B, Q, 4] cxcywh normalised
    pred_iou: jax.Array  # [B, Q, 1] IoU logits
    controller_params: jax.Array  # [B, Q, 169] dynamic-conv parameters
    mask_feats: jax.Array  # [B, H0, W0, 8] stride-8 pixel features (NHWC)
    mask_ref_px: jax.Array  # [B, Q, 2] mask reference centre in pixels (§O9)
    encoder: EncoderOutput | None  # image-side intermediates when requested (tests)
    image_size: tuple[int, int] = struct.field(pytree_node=False)  # (H, W) of the padded input


class HipiePrediction(NamedTuple):
    """SegLLM's answer per prompt (host NumPy)."""

    masks: np.ndarray  # [B, H, W] bool in the padded input frame (the letterbox is not undone)
    boxes_xyxy: np.ndarray  # [B, 4] float32 pixels, not clipped
    scores: np.ndarray  # [B] float32
    labels: np.ndarray  # [B] int (1 = target; 0 only when every top-k entry was a reference)
    sel_query: np.ndarray  # [B] int index into Q (bg queries first)
    mask_logits: np.ndarray  # [B, H/4, W/4] stride-4 logits of the chosen query
    selections: list[Selection]


class Hipie(HipieImageSide):
    """HIPIE segmentor: image side (inherited) + decoder, heads and CondInst mask branch."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.decoder = HipieDecoder(cfg, rngs=rngs)
        self.class_embed = make_class_embed(cfg, rngs)
        self.bbox_embed = make_bbox_embed(cfg, rngs)
        self.iou_head = make_iou_head(cfg, rngs)
        self.mask_head = MaskHeadSmallConv(cfg, rngs=rngs)
        self.controller = MLP(cfg.d_model, cfg.d_model, cfg.controller_out, cfg.controller_mlp_layers, rngs=rngs,
                              param_dtype=cfg.param_dtype, dtype=cfg.dtype)

    # ---- per image ------------------------------------------------------------------------
    def image_features(self, images_u8: jax.Array) -> LevelInputs:
        """uint8 RGB [I, H, W, 3] (padded, H and W multiples of 32) -> prompt-independent level inputs."""
        return self.prepare_levels(self.encode_image(normalize_pixels(images_u8, self.cfg)))

    # ---- per prompt -----------------------------------------------------------------------
    def decode(self, memory: jax.Array, lang_fused: jax.Array, spatial_shapes: Sequence[tuple[int, int]],
               image_size: tuple[int, int], *, padding_mask: jax.Array | None = None,
               valid_ratios: jax.Array | None = None, topk_indices: jax.Array | None = None,
               encoder: EncoderOutput | None = None) -> HipieOutputs:
        """Everything after the encoder: proposals, decoder, last-layer heads, mask-branch inputs.

        ``topk_indices`` [B, K] forces the two-stage selection (test hook for near-ties, README).
        """
        cfg = self.cfg
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
        starts = tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in shapes])[:-1])
        dec = self.decoder(memory, shapes, starts, self.class_embed, self.bbox_embed, padding_mask,
                           topk_indices=topk_indices, valid_ratios=valid_ratios)
        last = cfg.dec_layers - 1
        hs_last = dec.hs[last]  # [B, Q, C]
        pred_logits = self.class_embed[last](hs_last, lang_fused)
        pred_iou = self.iou_head[last](hs_last).astype(jnp.float32)
        controller_params = self.controller(hs_last).astype(jnp.float32)
        mask_feats = self.mask_head(split_memory_levels(memory, shapes))  # [B, H0, W0, 8]
        # §O9: centre of the box *entering* the last layer, in pixels of the padded input
        h, w = image_size
        prev = dec.inter_references[last - 1] if last > 0 else dec.init_reference
        mask_ref_px = prev[..., :2] * jnp.asarray([w, h], jnp.float32)
        q = dec.queries
        return HipieOutputs(
            lang_fused=lang_fused, memory=memory, enc_scores=q.enc_scores, enc_coord_unact=q.enc_coord_unact,
            topk_indices=q.topk_indices, topk_scores=q.topk_scores, init_reference=dec.init_reference,
            hs=dec.hs, inter_references=dec.inter_references, pred_logits=pred_logits,
            pred_boxes=dec.inter_references[last], pred_iou=pred_iou, controller_params=controller_params,
            mask_feats=mask_feats, mask_ref_px=mask_ref_px, encoder=encoder, image_size=(int(h), int(w)))

    def segment(self, levels: LevelInputs, prompts: jax.Array, image_index: jax.Array | None = None, *,
                topk_indices: jax.Array | None = None, return_intermediates: bool = False) -> HipieOutputs:
        """Per-prompt forward: ``prompts`` [B, 8, 768], ``image_index`` [B] (row of ``levels`` per prompt)."""
        enc = self.encode_prompt(levels, prompts, image_index, return_all_layers=return_intermediates)
        stride = self.cfg.mask_feat_stride
        h0, w0 = enc.spatial_shapes[0]
        image_size = (h0 * stride, w0 * stride)  # level 0 is stride 8 of the padded input
        # SegLLM's mask is all False and its ratios all 1 (§D5): both are exact no-ops then
        return self.decode(enc.memory, enc.lang_fused, enc.spatial_shapes, image_size,
                           padding_mask=enc.mask_flatten, valid_ratios=enc.valid_ratios,
                           topk_indices=topk_indices, encoder=enc if return_intermediates else None)

    # ---- masks ----------------------------------------------------------------------------
    def _mask_logits(self, outputs: HipieOutputs, ref_px: jax.Array, params: jax.Array) -> jax.Array:
        lg = dynamic_mask_logits(self.cfg, outputs.mask_feats, ref_px, params)  # [B, Q', H0, W0]
        return aligned_bilinear(lg, self.cfg.mask_feat_stride // self.cfg.mask_out_stride)  # [B, Q', 2H0, 2W0]

    def all_pred_masks(self, outputs: HipieOutputs) -> jax.Array:
        """Every query's stride-4 mask logits [B, Q, H/4, W/4] (the original's ``pred_masks``)."""
        return self._mask_logits(outputs, outputs.mask_ref_px, outputs.controller_params)

    def selected_mask(self, outputs: HipieOutputs, sel_query: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(stride-4 logits [B, H/4, W/4], mask [B, H, W] bool) of query ``sel_query`` [B] (index into Q)."""
        idx = jnp.asarray(sel_query, jnp.int32)[:, None, None]
        ref = jnp.take_along_axis(outputs.mask_ref_px, idx, axis=1)  # [B, 1, 2]
        params = jnp.take_along_axis(outputs.controller_params, idx, axis=1)  # [B, 1, 169]
        logits = self._mask_logits(outputs, ref, params)[:, 0]
        full = upsample_to_image(logits, outputs.image_size)
        return logits, binarize(full, self.cfg.mask_threshold)


# ---- jitted steps and the host driver ------------------------------------------------------------

@nnx.jit
def image_features_jit(model: Hipie, images_u8: jax.Array) -> LevelInputs:
    return model.image_features(images_u8)


@nnx.jit
def segment_jit(model: Hipie, levels: LevelInputs, prompts: jax.Array, image_index: jax.Array) -> HipieOutputs:
    return model.segment(levels, prompts, image_index)


@nnx.jit
def selected_mask_jit(model: Hipie, outputs: HipieOutputs, sel_query: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.selected_mask(outputs, sel_query)


def predict(model: Hipie, images_u8: np.ndarray | jax.Array, prompts: np.ndarray | jax.Array,
            image_index: np.ndarray | Sequence[int] | None = None, *,
            levels: LevelInputs | None = None) -> HipiePrediction:
    """SegLLM's segmentor end to end: one boolean mask, box and score per prompt.

    ``images_u8`` [I, S, S, 3] (see :func:`segllm_jax.preprocess.hipie_image`), ``prompts``
    [B, 8, 768], ``image_index`` [B] (default: prompt b on image b). Pass ``levels`` (from
    :func:`image_features_jit`) to reuse an image's backbone pass across rounds.
    """
    prompts = jnp.asarray(prompts)
    if image_index is None:
        image_index = np.arange(prompts.shape[0])
    image_index = jnp.asarray(np.asarray(image_index, np.int32))
    if levels is None:
        levels = image_features_jit(model, jnp.asarray(images_u8))
    out = segment_jit(model, levels, prompts, image_index)
    # host: NMS + top-k + target choice on a few hundred numbers per prompt (postprocess.py)
    sels = select_targets(np.asarray(out.pred_logits), np.asarray(out.pred_boxes), np.asarray(out.pred_iou),
                          model.cfg, out.image_size)
    sel_query = np.asarray([s.fg_query + model.cfg.num_bg_queries for s in sels], np.int32)
    logits, masks = selected_mask_jit(model, out, jnp.asarray(sel_query))
    return HipiePrediction(
        masks=np.asarray(masks), boxes_xyxy=np.stack([s.box_xyxy for s in sels]),
        scores=np.asarray([s.score for s in sels], np.float32), labels=np.asarray([s.label for s in sels]),
        sel_query=sel_query, mask_logits=np.asarray(logits), selections=sels)
