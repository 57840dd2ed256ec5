"""Loss terms of the HIPIE criterion as SegLLM trains it (architecture.md §T7, §T10).

Every function is pure jnp and jit-able with static shapes: ragged sets of matched pairs are passed
padded, with a boolean ``valid`` mask, and the normaliser ``num`` (the number of matched pairs of the
call, §O34: with OTA on, *every* normaliser is that count, not the GT count) is passed explicitly so
that the caller decides how it is reduced (per prompt, per batch, across devices).

When ``num == 0`` (empty target set) every loss is an exact 0, as in the original (which returns
``x.sum() * 0``).

Arithmetic follows the original's float32 expressions where the order matters for parity at 1e-5
(e.g. the box-loss factor ``a = 1 / (N + 1e-6) * N``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from segllm_jax.train.box_ops import elementwise_generalized_iou, elementwise_iou

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
PROMPT_L2_WEIGHT = 1e-3


def _safe_div(total: jax.Array, num: jax.Array | float) -> jax.Array:
    """total / num, and exactly 0 when num == 0 (the original's ``sum * 0`` branch)."""
    num = jnp.asarray(num, jnp.float32)
    return jnp.where(num > 0, total / jnp.maximum(num, 1.0), 0.0)


def bce_with_logits(x: jax.Array, y: jax.Array) -> jax.Array:
    """Elementwise ``F.binary_cross_entropy_with_logits``: max(x, 0) - x*y + log1p(exp(-|x|))."""
    return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid_focal_elementwise(x: jax.Array, y: jax.Array, alpha: float = FOCAL_ALPHA,
                              gamma: float = FOCAL_GAMMA) -> jax.Array:
    """RetinaNet focal loss per element: alpha_t * BCE(x, y) * (1 - p_t)^gamma (§T7 ``loss_ce``).

    ``y`` may be fractional (bilinear-sampled mask labels): p_t and alpha_t are then the linear blends.
    """
    p = jax.nn.sigmoid(x)
    ce = bce_with_logits(x, y)
    p_t = p * y + (1.0 - p) * (1.0 - y)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss


def token_focal_loss(logits: jax.Array, targets: jax.Array, num: jax.Array | float,
                     alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> jax.Array:
    """``loss_ce`` (labelsVL): Σ over all (b, q, token) focal / N.

    logits, targets [B, Q, T]; targets = positive map of the matched GT at matched queries, 0 elsewhere
    (unmatched queries, DN negatives and DN padding are all negatives). The text mask is all ones in
    SegLLM, so nothing is masked.
    """
    return _safe_div(jnp.sum(sigmoid_focal_elementwise(logits, targets, alpha, gamma)), num)


def box_loss_factor(num: jax.Array | float) -> jax.Array:
    """PANOPTIC_BOX_LOSS factor a = 1 / (N_thing + 1e-6) * N with every GT a thing: N / (N + 1e-6)."""
    num = jnp.asarray(num, jnp.float32)
    return 1.0 / (num + 1e-6) * num


def l1_box_loss(src: jax.Array, tgt: jax.Array, valid: jax.Array, num: jax.Array | float) -> jax.Array:
    """``loss_bbox``: Σ |src - tgt| over valid pairs and 4 cxcywh coords, × a / N. src, tgt [N, 4], valid [N]."""
    l1 = jnp.abs(src - tgt) * valid[..., None]
    return _safe_div(jnp.sum(l1 * box_loss_factor(num)), num)


def giou_box_loss(src_xyxy: jax.Array, tgt_xyxy: jax.Array, valid: jax.Array,
                  num: jax.Array | float) -> jax.Array:
    """``loss_giou``: Σ (1 - GIoU_fvcore) over valid pairs × a / N. Boxes [N, 4] xyxy, valid [N]."""
    # invalid (padding) pairs are replaced by a dummy unit box so no NaN enters the masked sum
    unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], src_xyxy.dtype)
    s = jnp.where(valid[..., None], src_xyxy, unit)
    t = jnp.where(valid[..., None], tgt_xyxy, unit)
    loss = (1.0 - elementwise_generalized_iou(s, t)) * valid
    return _safe_div(jnp.sum(loss * box_loss_factor(num)), num)


def boxiou_loss(iou_logits: jax.Array, src_xyxy: jax.Array, tgt_xyxy: jax.Array, valid: jax.Array,
                num: jax.Array | float) -> jax.Array:
    """``loss_boxiou``: mean over valid pairs of BCE(iou_logit, IoU(src, tgt)) × a.

    iou_logits [N], boxes [N, 4] xyxy. IoU = I / U without epsilon, no gradient (a target).
    """
    unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], src_xyxy.dtype)
    s = jnp.where(valid[..., None], src_xyxy, unit)
    t = jnp.where(valid[..., None], tgt_xyxy, unit)
    iou = jax.lax.stop_gradient(elementwise_iou(s, t))
    loss = bce_with_logits(iou_logits, iou) * valid
    return _safe_div(jnp.sum(loss), num) * box_loss_factor(num)


def mask_focal_loss(point_logits: jax.Array, point_labels: jax.Array, valid: jax.Array,
                    num: jax.Array | float, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> jax.Array:
    """``loss_mask``: Σ_masks mean_points focal(x, y) / N (§T7: focal, **not** plain BCE).

    point_logits, point_labels [N, P]; valid [N].
    """
    per_mask = jnp.mean(sigmoid_focal_elementwise(point_logits, point_labels, alpha, gamma), axis=-1)
    return _safe_div(jnp.sum(per_mask * valid), num)


def mask_bce_loss(point_logits: jax.Array, point_labels: jax.Array, valid: jax.Array,
                  num: jax.Array | float) -> jax.Array:
    """Mask2Former-style ``sigmoid_ce_loss``: Σ_masks mean_points BCE / N.

    Not used by SegLLM's criterion (its ``loss_mask`` is focal, see :func:`mask_focal_loss`); kept for
    the bg matcher's cost and for experiments.
    """
    per_mask = jnp.mean(bce_with_logits(point_logits, point_labels), axis=-1)
    return _safe_div(jnp.sum(per_mask * valid), num)


def dice_loss(point_logits: jax.Array, point_labels: jax.Array, valid: jax.Array,
              num: jax.Array | float) -> jax.Array:
    """``loss_dice``: Σ_masks [1 - (2 Σ σ(x) y + 1) / (Σ σ(x) + Σ y + 1)] / N. Inputs [N, P], valid [N]."""
    p = jax.nn.sigmoid(point_logits)
    numerator = 2.0 * jnp.sum(p * point_labels, axis=-1)
    denominator = jnp.sum(p, axis=-1) + jnp.sum(point_labels, axis=-1)
    per_mask = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return _safe_div(jnp.sum(per_mask * valid), num)


def prompt_l2_loss(prompts: jax.Array, weight: float = PROMPT_L2_WEIGHT) -> jax.Array:
    """SegLLM ``sparse_embed_L2_loss_weight`` term: weight · mean(prompt²) over all kept prompt entries (§T10)."""
    return weight * jnp.mean(jnp.square(prompts.astype(jnp.float32)))
