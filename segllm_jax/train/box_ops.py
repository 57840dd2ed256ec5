"""Box utilities for the HIPIE training criterion (jnp, jit-able).

Boxes are normalised **cxcywh** in the model and the targets; every overlap measure works on **xyxy**.
``segllm_jax.models.hipie.postprocess.box_cxcywh_to_xyxy`` is a host-side NumPy helper for NMS; the
criterion needs the same conversion on device (inside the train step), so the jnp versions live here.

Three IoU flavours exist in the original and differ only in where the epsilons sit; the golden
criterion values are sensitive to them at the 1e-7 level, so each is kept separate
(architecture.md §T4, §T7):

* :func:`pairwise_iou` — torchvision ``box_iou`` (no epsilon), used for simOTA's dynamic k and the
  ``loss_boxiou`` target (diagonal).
* :func:`pairwise_generalized_iou` — DETR ``generalized_box_iou`` with ``+1e-7`` on the enclosing area
  only, used by the matcher costs.
* :func:`elementwise_generalized_iou` — fvcore ``giou_loss`` arithmetic (``+1e-7`` on union and on the
  enclosing area, intersection forced to 0 unless both overlaps are positive), used by ``loss_giou``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GIOU_EPS = 1e-7


def box_cxcywh_to_xyxy(b: jax.Array) -> jax.Array:  # [..., 4] -> [..., 4]
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(b: jax.Array) -> jax.Array:  # [..., 4] -> [..., 4]
    x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(b: jax.Array) -> jax.Array:  # xyxy [..., 4] -> [...]
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _pairwise_inter_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a [N, 4], b [M, 4] xyxy -> (intersection, union) [N, M]."""
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """torchvision ``box_iou``: I / U without epsilon. a [N, 4], b [M, 4] xyxy -> [N, M]."""
    inter, union = _pairwise_inter_union(a, b)
    return inter / union


def pairwise_generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """DETR/HIPIE ``generalized_box_iou``: IoU - (C - U) / (C + 1e-7), IoU = I / U. -> [N, M]."""
    inter, union = _pairwise_inter_union(a, b)
    iou = inter / union
    lt = jnp.minimum(a[:, None, :2], b[None, :, :2])
    rb = jnp.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    area_c = wh[..., 0] * wh[..., 1]
    return iou - (area_c - union) / (area_c + GIOU_EPS)


def elementwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Diagonal of :func:`pairwise_iou` for paired boxes a, b [..., 4] xyxy -> [...] (``compute_box_iou``)."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter / union


def elementwise_generalized_iou(a: jax.Array, b: jax.Array, eps: float = GIOU_EPS) -> jax.Array:
    """fvcore ``giou_loss`` GIoU for paired boxes a, b [..., 4] xyxy -> [...].

    IoU = I / (U + eps), GIoU = IoU - (C - U) / (C + eps); I = 0 unless both overlaps are > 0.
    """
    xk1 = jnp.maximum(a[..., 0], b[..., 0])
    yk1 = jnp.maximum(a[..., 1], b[..., 1])
    xk2 = jnp.minimum(a[..., 2], b[..., 2])
    yk2 = jnp.minimum(a[..., 3], b[..., 3])
    overlap = (yk2 > yk1) & (xk2 > xk1)
    inter = jnp.where(overlap, (xk2 - xk1) * (yk2 - yk1), 0.0)
    union = box_area(a) + box_area(b) - inter
    iou = inter / (union + eps)
    xc1 = jnp.minimum(a[..., 0], b[..., 0])
    yc1 = jnp.minimum(a[..., 1], b[..., 1])
    xc2 = jnp.maximum(a[..., 2], b[..., 2])
    yc2 = jnp.maximum(a[..., 3], b[..., 3])
    area_c = (xc2 - xc1) * (yc2 - yc1)
    return iou - (area_c - union) / (area_c + eps)


def boxes_from_masks(masks: jax.Array) -> jax.Array:
    """detectron2 ``BitMasks.get_bounding_boxes``: masks [..., H, W] -> xyxy pixels [..., 4].

    (x_min, y_min, x_max + 1, y_max + 1) over pixels > 0; an empty mask gives zeros (architecture.md §T1).
    """
    m = masks > 0
    h, w = m.shape[-2:]
    rows = jnp.any(m, axis=-1)  # [..., H]
    cols = jnp.any(m, axis=-2)  # [..., W]
    ar_h = jnp.arange(h)
    ar_w = jnp.arange(w)
    y0 = jnp.min(jnp.where(rows, ar_h, h), axis=-1)
    y1 = jnp.max(jnp.where(rows, ar_h + 1, 0), axis=-1)
    x0 = jnp.min(jnp.where(cols, ar_w, w), axis=-1)
    x1 = jnp.max(jnp.where(cols, ar_w + 1, 0), axis=-1)
    box = jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.float32)
    return jnp.where(jnp.any(rows, axis=-1)[..., None], box, 0.0)
