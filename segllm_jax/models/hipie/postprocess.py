"""Per-prompt instance scoring, NMS, top-k and SegLLM's target selection (architecture.md §H14, §O17).

Why NumPy on the host: the selection is a few hundred numbers per prompt (100 boxes, 2 classes),
greedy NMS is inherently sequential and data-dependent, and parity with the original needs
torchvision's exact float32 arithmetic (including the ``batched_nms`` coordinate-offset trick)
and its tie rules. A device version would gain nothing measurable and would have to emulate the
same scalar loop. The heavy, per-pixel part (the selected query's mask) stays on device
(``Hipie.selected_mask``); only ``pred_logits``/``pred_boxes``/``pred_iou`` of the foreground
queries come to the host.

Pipeline per prompt (fg queries only; the ``num_bg_queries`` in front are dropped):

1. class logits = mean (or max) of the token logits of each class (tokens 0-3 -> class 0
   "reference", 4-7 -> class 1 "target"; MAX_POOL off -> mean);
2. prob = sqrt(sigmoid(class) * sigmoid(iou));
3. class-aware NMS (IoU > 0.7 suppresses) on the normalised xyxy boxes with score = max prob
   and category = argmax;
4. top-k (k = min(100, 2 * kept)) over the kept (query, class) pairs, flattened query-major;
5. SegLLM: entries of class 0 get score -1; the first maximum wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segllm_jax.config import HipieConfig


@dataclass(frozen=True)
class Selection:
    """Post-processing of one prompt. Query indices are foreground-relative (0..num_queries-1)."""

    keep: np.ndarray  # [N_keep] int, NMS output order (descending score)
    topk_query: np.ndarray  # [k] int
    topk_label: np.ndarray  # [k] int (0 = reference, 1 = target)
    topk_score: np.ndarray  # [k] float32
    fg_query: int  # the chosen entry's query
    label: int
    score: float
    box_xyxy: np.ndarray  # [4] float32 pixels of the S x S frame, not clipped


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)


def class_logits(token_logits: np.ndarray, num_classes: int = 2, max_pool: bool = False) -> np.ndarray:
    """[N, T] token logits -> [N, num_classes]: consecutive equal token groups, mean (or max)."""
    t = np.asarray(token_logits, np.float32)
    groups = t.reshape(t.shape[0], num_classes, t.shape[1] // num_classes)
    return (groups.max(-1) if max_pool else groups.mean(-1, dtype=np.float32)).astype(np.float32)


def instance_probs(class_logit: np.ndarray, iou_logit: np.ndarray | None) -> np.ndarray:
    """sqrt(sigmoid(class) * sigmoid(iou)) [N, C]; plain sigmoid(class) without an IoU branch."""
    p = sigmoid(class_logit)
    if iou_logit is None:
        return p
    return np.sqrt(p * sigmoid(np.asarray(iou_logit, np.float32).reshape(-1, 1))).astype(np.float32)


def box_cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, np.float32)
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    half = np.float32(0.5)
    return np.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], -1).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS with torchvision's CPU arithmetic (float32; ``IoU > threshold`` suppresses).

    Order: descending score, stable (equal scores keep the lower index first).
    """
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    n = boxes.shape[0]
    if n == 0:
        return np.zeros((0,), np.int64)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(n, bool)
    thr = np.float32(iou_threshold)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        w = np.maximum(np.float32(0.0), xx2 - xx1)
        h = np.maximum(np.float32(0.0), yy2 - yy1)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr > thr]] = True
    return np.asarray(keep, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """``torchvision.ops.batched_nms`` for small inputs: the coordinate-offset trick.

    Each category's boxes are shifted by ``category * (max coordinate + 1)`` so boxes of different
    categories never overlap; the shift changes float32 rounding of the IoU slightly, which is why
    it is reproduced instead of running NMS per class.
    """
    boxes = np.asarray(boxes, np.float32)
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.int64)
    offsets = np.asarray(idxs, np.float32) * (boxes.max() + np.float32(1.0))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def topk_desc(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, descending; ties keep the lower index first."""
    return np.argsort(-np.asarray(values, np.float32), kind="stable")[:k]


def select_target(pred_logits: np.ndarray, pred_boxes: np.ndarray, pred_iou: np.ndarray | None,
                  cfg: HipieConfig, image_size: int | tuple[int, int]) -> Selection:
    """One prompt's outputs over all queries (bg first) -> SegLLM's chosen instance.

    ``pred_logits`` [Q, T], ``pred_boxes`` [Q, 4] cxcywh normalised, ``pred_iou`` [Q, 1] logits.
    """
    h, w = (image_size, image_size) if np.isscalar(image_size) else image_size
    nb = cfg.num_bg_queries
    logits = np.asarray(pred_logits, np.float32)[nb:]
    boxes = np.asarray(pred_boxes, np.float32)[nb:]
    iou = None if pred_iou is None else np.asarray(pred_iou, np.float32)[nb:]
    prob = instance_probs(class_logits(logits, cfg.num_classes, cfg.max_pool_tokens), iou)  # [N, C]
    nms_scores = prob.max(1)
    labels = prob.argmax(1)
    keep = batched_nms(box_cxcywh_to_xyxy(boxes), nms_scores, labels, cfg.nms_iou)
    kept = prob[keep]  # [N_keep, C]
    k = min(cfg.test_topk, kept.size)
    flat = topk_desc(kept.reshape(-1), k)
    topk_score = kept.reshape(-1)[flat]
    topk_query = keep[flat // cfg.num_classes]
    topk_label = flat % cfg.num_classes
    # SegLLM: the "reference" class (label 0) must not win; first maximum on ties
    masked = np.where(topk_label == 0, np.float32(-1.0), topk_score)
    best = int(np.argmax(masked))
    q = int(topk_query[best])
    box = box_cxcywh_to_xyxy(boxes[q]) * np.asarray([w, h, w, h], np.float32)
    return Selection(keep=keep, topk_query=topk_query, topk_label=topk_label, topk_score=topk_score,
                     fg_query=q, label=int(topk_label[best]), score=float(topk_score[best]), box_xyxy=box)


def select_targets(pred_logits: np.ndarray, pred_boxes: np.ndarray, pred_iou: np.ndarray | None,
                   cfg: HipieConfig, image_size: int | tuple[int, int]) -> list[Selection]:
    """:func:`select_target` for every prompt of a batch ([B, Q, ...] arrays)."""
    return [select_target(pred_logits[b], pred_boxes[b], None if pred_iou is None else pred_iou[b], cfg, image_size)
            for b in range(np.asarray(pred_logits).shape[0])]
