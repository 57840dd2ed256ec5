"""Matchers of HIPIE's criterion as SegLLM uses it (architecture.md §T4 to §T6).

* fg queries, every decoder layer: **simOTA** (``HungarianMatcherVL.forward_ota``; MODEL.OTA = True),
  dynamic-k, not Hungarian (§T4). Its cost uses focal class cost + 3·(−GIoU) + in-box/in-centre
  priors; the config's cost weights are *not* used there.
* encoder proposals (``_enc``): **Hungarian** (``forward(force_box_loss=True)``) on binary targets with
  C = 5·L1 + 2·class + 2·(−GIoU) (§T5). (The configured mask/dice costs 5/5 are never used by SegLLM:
  no mask cost is computed anywhere; :class:`MatcherCosts` keeps them for the record.)
* DN group: fixed indices, see :func:`segllm_jax.train.denoising.dn_match_indices` (§T6).

Why the split between device and host: the cost matrices are dense jnp (jit-able, run on device next
to the forward pass), while the assignment itself — scipy ``linear_sum_assignment`` and simOTA's
iterative dynamic-k resolution — is data-dependent and ragged (the number of matched queries per
prompt varies), so it runs on the host, exactly as in the original (which moves the cost to the CPU
and calls scipy). Matching is under ``no_grad`` in the original; the indices are plain integers and
feed the criterion as padded index arrays (:func:`pad_indices`).

Host-side arithmetic (cost updates of the dynamic-k loop) is float32, as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from segllm_jax.train.box_ops import box_cxcywh_to_xyxy, pairwise_generalized_iou, pairwise_iou

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
OTA_CENTER_RADIUS = 2.5
OTA_STRIDE = 32.0
OTA_CANDIDATES = 10

Indices = list[tuple[np.ndarray, np.ndarray]]  # per prompt (src query indices, tgt GT indices)


@dataclass(frozen=True)
class MatcherCosts:
    """SET_COST_* of the config (§T4, §T5). mask/dice are configured but unused by SegLLM's matchers."""
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0


class PaddedIndices(NamedTuple):
    src: jax.Array    # [..., B, K] int32 query index (0 where invalid)
    tgt: jax.Array    # [..., B, K] int32 GT index (0 where invalid)
    valid: jax.Array  # [..., B, K] bool


# --------------------------------------------------------------------------------------------- costs (jnp)

def focal_class_cost(logits: jax.Array, positive_map: jax.Array) -> jax.Array:
    """Token focal cost (§T4): mean over the GT's positive tokens of (pos − neg)[q, t].

    logits [Q, T], positive_map [G, T] (bool/0-1) -> [Q, G]. pos = α(1−p)²(−log(p+1e-8)),
    neg = (1−α)p²(−log(1−p+1e-8)). A GT without positive tokens gets cost 0 (instead of NaN).
    """
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    neg = (1 - FOCAL_ALPHA) * p ** FOCAL_GAMMA * -jnp.log(1 - p + 1e-8)
    pos = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * -jnp.log(p + 1e-8)
    pm = positive_map.astype(jnp.float32)                       # [G, T]
    # elementwise product + sum (not a matmul) so reduced-precision dot passes never touch the cost
    total = jnp.sum((pos - neg)[:, None, :] * pm[None], axis=-1)  # [Q, G]
    count = jnp.sum(pm, axis=-1)[None]                          # [1, G]
    return total / jnp.maximum(count, 1.0)


def _dummy_invalid(gt_boxes: jax.Array, gt_valid: jax.Array | None) -> jax.Array:
    """Padding GT rows get a harmless box so no NaN appears in the (later ignored) columns."""
    if gt_valid is None:
        return gt_boxes
    return jnp.where(gt_valid[:, None], gt_boxes, jnp.asarray([0.5, 0.5, 1.0, 1.0], gt_boxes.dtype))


def ota_cost(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array, positive_map: jax.Array,
             gt_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """simOTA cost and IoU matrices for one prompt (§T4, ``compute_cost``).

    logits [Q, T], boxes [Q, 4] cxcywh, gt_boxes [G, 4] cxcywh, positive_map [G, T], gt_valid [G]
    -> (cost [Q, G], iou [Q, G]). cost = class + 3·(−GIoU) + 100·¬(in-box ∧ in-centre), +10000 on rows
    whose centre is neither in any GT box nor near any GT centre (the fg mask ignores padding GT).
    """
    gt_boxes = _dummy_invalid(gt_boxes, gt_valid)
    valid = jnp.ones(gt_boxes.shape[0], bool) if gt_valid is None else gt_valid.astype(bool)
    pred_xyxy = box_cxcywh_to_xyxy(boxes)
    gt_xyxy = box_cxcywh_to_xyxy(gt_boxes)
    cx, cy = boxes[:, 0:1], boxes[:, 1:2]                       # [Q, 1]
    in_box = ((cx > gt_xyxy[None, :, 0]) & (cx < gt_xyxy[None, :, 2])
              & (cy > gt_xyxy[None, :, 1]) & (cy < gt_xyxy[None, :, 3]))          # [Q, G]
    r = OTA_CENTER_RADIUS / OTA_STRIDE
    in_ctr = ((cx > (gt_boxes[None, :, 0] - r)) & (cx < (gt_boxes[None, :, 0] + r))
              & (cy > (gt_boxes[None, :, 1] - r)) & (cy < (gt_boxes[None, :, 1] + r)))
    fg = jnp.any((in_box | in_ctr) & valid[None], axis=1)      # [Q]
    iou = pairwise_iou(pred_xyxy, gt_xyxy)
    cost_giou = -pairwise_generalized_iou(pred_xyxy, gt_xyxy)
    cost = focal_class_cost(logits, positive_map) + 3.0 * cost_giou + 100.0 * (~(in_box & in_ctr))
    cost = jnp.where(fg[:, None], cost, cost + 10000.0)
    return cost, iou


def hungarian_cost(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array, positive_map: jax.Array,
                   costs: MatcherCosts = MatcherCosts(), gt_valid: jax.Array | None = None) -> jax.Array:
    """Hungarian cost for one prompt (§T5): cost_bbox·L1(cdist) + cost_class·class + cost_giou·(−GIoU).

    logits [S, C], boxes [S, 4] cxcywh, gt_boxes [G, 4], positive_map [G, C] -> [S, G]. For the encoder
    proposals C = 1 and positive_map = ones (binary targets, STILL_CLS_FOR_ENCODER).
    """
    gt_boxes = _dummy_invalid(gt_boxes, gt_valid)
    cost_bbox = jnp.sum(jnp.abs(boxes[:, None, :] - gt_boxes[None, :, :]), axis=-1)
    cost_giou = -pairwise_generalized_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes))
    cost_class = focal_class_cost(logits, positive_map)
    return costs.cost_bbox * cost_bbox + costs.cost_class * cost_class + costs.cost_giou * cost_giou


batched_ota_cost = jax.jit(jax.vmap(ota_cost))
batched_hungarian_cost = jax.jit(jax.vmap(hungarian_cost, in_axes=(0, 0, 0, 0, None, 0)), static_argnums=4)


# -------------------------------------------------------------------------------------- assignment (host)

def dynamic_k_matching(cost: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """simOTA assignment for one prompt (host, float32), ``dynamic_k_matching`` of the original.

    cost, iou [Q, G] -> (src ascending query indices, tgt GT index per src). Steps (§T4):
    k_j = max(1, int(Σ top-10 IoU of column j)); the k_j cheapest queries of each GT are marked; a
    query marked for several GT keeps its argmin-cost GT; while a GT has no query, the matched rows get
    +1e5 and each unmatched GT takes its argmin-cost query, conflicts being re-resolved with the **first**
    conflict mask (quirk of the original, copied).
    """
    cost = np.array(cost, np.float32, copy=True)
    iou = np.asarray(iou, np.float32)
    q, g = cost.shape
    if g == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    match = np.zeros((q, g), np.float32)
    n_cand = min(q, OTA_CANDIDATES)
    topk_iou = -np.sort(-iou, axis=0)[:n_cand]                        # [n_cand, G] descending
    ks = np.maximum(topk_iou.sum(0, dtype=np.float32).astype(np.int32), 1)
    for j in range(g):
        pos = np.argsort(cost[:, j], kind="stable")[: int(ks[j])]
        match[pos, j] = 1.0
    multi = match.sum(1) > 1                                          # the first conflict mask (reused)
    if multi.any():
        best = cost[multi].argmin(1)
        match[multi] = 0.0
        match[np.nonzero(multi)[0], best] = 1.0
    while (match.sum(0) == 0).any():
        matched = match.sum(1) > 0
        cost[matched] += np.float32(100000.0)
        for j in np.nonzero(match.sum(0) == 0)[0]:
            match[int(np.argmin(cost[:, j])), j] = 1.0
        if (match.sum(1) > 1).any() and multi.any():
            best = cost[multi].argmin(1)
            match[multi] = 0.0
            match[np.nonzero(multi)[0], best] = 1.0
    selected = np.nonzero(match.sum(1) > 0)[0]
    return selected.astype(np.int64), match[selected].argmax(1).astype(np.int64)


def simota_match(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array, gt_positive_map: jax.Array,
                 gt_valid: jax.Array) -> Indices:
    """simOTA indices for every prompt of one decoder layer (§T4).

    logits [B, Q, T], boxes [B, Q, 4], gt_boxes [B, G, 4], gt_positive_map [B, G, T], gt_valid [B, G]
    (valid GT first). Costs on device, assignment on the host.
    """
    cost, iou = jax.device_get(batched_ota_cost(logits, boxes, gt_boxes, gt_positive_map, gt_valid))
    counts = np.asarray(gt_valid).sum(1)
    return [dynamic_k_matching(cost[b][:, :n], iou[b][:, :n]) for b, n in enumerate(counts)]


def hungarian_match(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array, gt_positive_map: jax.Array,
                    gt_valid: jax.Array, costs: MatcherCosts = MatcherCosts()) -> Indices:
    """Hungarian indices per prompt (§T5): scipy ``linear_sum_assignment``, src ascending."""
    cost = np.asarray(jax.device_get(batched_hungarian_cost(logits, boxes, gt_boxes, gt_positive_map,
                                                            costs, gt_valid)))
    counts = np.asarray(gt_valid).sum(1)
    out = []
    for b, n in enumerate(counts):
        src, tgt = linear_sum_assignment(cost[b][:, :n])
        out.append((src.astype(np.int64), tgt.astype(np.int64)))
    return out


def encoder_match(enc_logits: jax.Array, enc_boxes: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                  costs: MatcherCosts = MatcherCosts()) -> Indices:
    """Encoder-proposal matching (§T5): binary targets (positive map = ones [G, 1]) over all S tokens.

    enc_logits [B, S, 1] (Still_Classifier), enc_boxes [B, S, 4] cxcywh.
    """
    ones = jnp.ones(gt_boxes.shape[:2] + (1,), jnp.float32)
    return hungarian_match(enc_logits, enc_boxes, gt_boxes, ones, gt_valid, costs)


def pad_indices(indices: Sequence[tuple[np.ndarray, np.ndarray]], k: int | None = None) -> PaddedIndices:
    """Ragged per-prompt (src, tgt) -> padded [B, K] arrays + valid mask (static K for jit)."""
    k_needed = max((len(s) for s, _ in indices), default=0)
    k = max(k_needed, 1) if k is None else k
    if k < k_needed:
        raise ValueError(f"pad_indices: K={k} is smaller than the {k_needed} matches of one prompt; raise K.")
    b = len(indices)
    src = np.zeros((b, k), np.int32)
    tgt = np.zeros((b, k), np.int32)
    valid = np.zeros((b, k), bool)
    for i, (s, t) in enumerate(indices):
        src[i, : len(s)] = s
        tgt[i, : len(t)] = t
        valid[i, : len(s)] = True
    return PaddedIndices(jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(valid))


def pad_layer_indices(per_layer: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
                      k: int | None = None) -> PaddedIndices:
    """Per-layer ragged indices (e.g. simOTA of every decoder layer) -> PaddedIndices [L, B, K] with one
    common K (default: the largest per-prompt match count over all layers)."""
    k_needed = max((len(s) for layer in per_layer for s, _ in layer), default=0)
    k = max(k_needed, 1) if k is None else k
    padded = [pad_indices(layer, k) for layer in per_layer]
    return PaddedIndices(*[jnp.stack(x) for x in zip(*padded, strict=True)])
