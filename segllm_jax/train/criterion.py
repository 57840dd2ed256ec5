"""HIPIE training criterion (``DINOCriterion`` as SegLLM uses it), architecture.md §T1, §T3, §T7 to §T10.

One training step of SegLLM's mask decoder is supervised by three criterion calls that share the
decoder output, then merged and weighted:

* **fg** — the 100 foreground queries, simOTA indices per layer (§T4), masks of the matched queries,
  ``loss_boxiou`` on aux layers 0–4 only (the final dict has no IoU prediction: quirk, §O31).
* **bg** — the 10 background queries against empty targets: every term is 0 and the group weight is 0
  (kept so that a NaN in bg outputs propagates, as ``0 · x`` does in the original).
* **gt** (DN) — the DN slots, fixed indices (§T6), plus the encoder proposals (``_enc``: ce/bbox/giou,
  Hungarian, §T5) which are attached only to this call.

Every call also writes 18 zero placeholders ``loss_{bbox,giou,class}_dn[_i]`` (dead DN-loss path of the
original, §O33). Merge = fg·1 + bg·0 + gt·1 (§T9); weighting = ``weight_dict`` × LOSS_WEIGHT_DET (§T9);
total = Σ weighted + 1e-3·mean(prompt²) (§T10).

Static shapes: matched pairs are padded to ``K`` per prompt (:class:`~segllm_jax.train.matcher.PaddedIndices`
with a ``valid`` mask), GT to ``G`` per prompt (:class:`HipieTargets`). The predicted masks of a group
are those of its matched pairs in index order, ``[L, B, K, h, w]`` (the model runs the dynamic mask head
on the matched queries only, as the original does).

Point sampling (§T8): per mask call, U1 ~ U[0,1)² (oversample 3 × 12544 = 37632 points) is sampled on the
predicted logits, the 9408 (= 0.75 × 12544) most uncertain (−|logit|) are kept and U2 (3136 uniform points)
is appended. The uniforms come from a JAX key, or can be injected (stored U1/U2 or the final points) to
replay the original's draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segllm_jax.train import losses as L
from segllm_jax.train.box_ops import box_cxcywh_to_xyxy
from segllm_jax.train.matcher import PaddedIndices

NUM_POINTS = 112 * 112              # 12544
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75
MASK_OUT_STRIDE = 4
SIZE_DIVISIBILITY = 32
DN_PLACEHOLDER_KEYS = ("loss_bbox_dn", "loss_giou_dn", "loss_class_dn")


# ------------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class CriterionConfig:
    """Weights and constants in force for SegLLM (§T3, §T8, §T9)."""
    class_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    loss_weight_det: float = 1.0
    fg_weight: float = 1.0           # FINAL_FG_WEIGHT
    bg_weight: float = 0.0           # FINAL_BG_WEIGHT
    gt_weight: float = 1.0           # FINAL_GT_WEIGHT
    dec_layers: int = 6
    prompt_l2_weight: float = 1e-3
    num_points: int = NUM_POINTS
    oversample_ratio: float = OVERSAMPLE_RATIO
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO
    mask_out_stride: int = MASK_OUT_STRIDE

    @property
    def num_oversampled(self) -> int:
        return int(self.num_points * self.oversample_ratio)

    @property
    def num_uncertain(self) -> int:
        return int(self.importance_sample_ratio * self.num_points)

    @property
    def num_random(self) -> int:
        return self.num_points - self.num_uncertain


def weight_dict(cfg: CriterionConfig = CriterionConfig()) -> dict[str, float]:
    """The criterion's ``weight_dict`` (53 keys, §T9). ``loss_boxiou_*`` and ``loss_class_dn*`` are absent
    (weight 1 when summed); ``loss_{mask,dice}_enc`` are listed but never produced."""
    base = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight,
            "loss_bbox": cfg.bbox_weight, "loss_giou": cfg.giou_weight}
    wd = dict(base)
    wd.update({f"{k}_dn": v for k, v in base.items() if k not in ("loss_mask", "loss_dice")})
    for i in range(cfg.dec_layers - 1):
        wd.update({f"{k}_{i}": v for k, v in list(wd.items()) if not k[-1].isdigit()})
    wd.update({f"{k}_enc": v for k, v in base.items()})
    return wd


# ----------------------------------------------------------------------------------------------- targets

class HipieTargets(NamedTuple):
    """GT of every prompt, padded to G (valid GT first)."""
    boxes: jax.Array         # [B, G, 4] cxcywh normalised
    positive_map: jax.Array  # [B, G, T] {0, 1}
    valid: jax.Array         # [B, G] bool
    masks: jax.Array         # [B, G, H, W] {0, 1} on the padded input frame

    @property
    def counts(self) -> np.ndarray:
        return np.asarray(jax.device_get(self.valid)).sum(1)


def segllm_targets(target_masks: np.ndarray, prev_masks: np.ndarray, num_tokens: int = 8) -> HipieTargets:
    """SegLLM's GT per kept round (§T1), host-side.

    target_masks, prev_masks [n, H, W] (already round-subsampled). A round whose reference mask is non-empty
    gets 2 GT [reference (class 1, tokens 0..T/2-1), target (class 2, tokens T/2..T-1)], otherwise
    1 GT [target (tokens T/2..T-1)]. Boxes from masks: (x_min, y_min, x_max+1, y_max+1) / (W, H, W, H) -> cxcywh.
    """
    target_masks = np.asarray(target_masks) > 0
    prev_masks = np.asarray(prev_masks) > 0
    n, h, w = target_masks.shape
    half = num_tokens // 2
    per_round = []
    for i in range(n):
        if prev_masks[i].any():
            per_round.append(([prev_masks[i], target_masks[i]], [(0, half), (half, num_tokens)]))
        else:
            per_round.append(([target_masks[i]], [(half, num_tokens)]))
    g = max(len(m) for m, _ in per_round)
    masks = np.zeros((n, g, h, w), np.float32)
    pmap = np.zeros((n, g, num_tokens), np.float32)
    valid = np.zeros((n, g), bool)
    for i, (ms, spans) in enumerate(per_round):
        for j, (m, (t0, t1)) in enumerate(zip(ms, spans, strict=True)):
            masks[i, j] = m
            pmap[i, j, t0:t1] = 1.0
            valid[i, j] = True
    xyxy = _np_boxes_from_masks(masks) / np.asarray([w, h, w, h], np.float32)
    boxes = np.concatenate([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], -1)
    return HipieTargets(jnp.asarray(boxes), jnp.asarray(pmap), jnp.asarray(valid), jnp.asarray(masks))


def _np_boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Host twin of :func:`segllm_jax.train.box_ops.boxes_from_masks`: [..., H, W] -> xyxy pixels [..., 4] f32."""
    m = np.asarray(masks) > 0
    rows, cols = m.any(-1), m.any(-2)
    h, w = m.shape[-2:]
    y0 = np.where(rows, np.arange(h), h).min(-1)
    y1 = np.where(rows, np.arange(h) + 1, 0).max(-1)
    x0 = np.where(cols, np.arange(w), w).min(-1)
    x1 = np.where(cols, np.arange(w) + 1, 0).max(-1)
    box = np.stack([x0, y0, x1, y1], -1).astype(np.float32)
    return np.where(rows.any(-1)[..., None], box, np.float32(0))


def downsample_gt_masks(masks: jax.Array, stride: int = MASK_OUT_STRIDE,
                        size_divisibility: int = SIZE_DIVISIBILITY) -> jax.Array:
    """GT masks at the mask-head resolution (§T8): zero-pad H, W to a multiple of 32, take [s/2::s, s/2::s].

    masks [..., H, W] -> [..., ceil32(H)/s, ceil32(W)/s] float32.
    """
    h, w = masks.shape[-2:]
    ph = -(-h // size_divisibility) * size_divisibility
    pw = -(-w // size_divisibility) * size_divisibility
    pad = [(0, 0)] * (masks.ndim - 2) + [(0, ph - h), (0, pw - w)]
    m = jnp.pad(masks.astype(jnp.float32), pad)
    start = stride // 2
    return m[..., start::stride, start::stride]


# ---------------------------------------------------------------------------------------- point sampling

def point_sample(maps: jax.Array, coords: jax.Array) -> jax.Array:
    """Bilinear ``grid_sample`` (align_corners=False, zero padding) at points in [0, 1]².

    maps [N, h, w], coords [N, P, 2] as (x, y) -> [N, P]. Pixel centres sit at (i + 0.5) / size.
    """
    n, h, w = maps.shape
    gx = 2.0 * coords[..., 0] - 1.0
    gy = 2.0 * coords[..., 1] - 1.0
    ix = ((gx + 1.0) * w - 1.0) / 2.0                              # [N, P]
    iy = ((gy + 1.0) * h - 1.0) / 2.0
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    x1 = x0 + 1.0
    y1 = y0 + 1.0
    flat = maps.reshape(n, h * w)

    def tap(xc: jax.Array, yc: jax.Array) -> jax.Array:
        inside = (xc >= 0) & (xc <= w - 1) & (yc >= 0) & (yc <= h - 1)
        xi = jnp.clip(xc, 0, w - 1).astype(jnp.int32)
        yi = jnp.clip(yc, 0, h - 1).astype(jnp.int32)
        v = jnp.take_along_axis(flat, yi * w + xi, axis=1)
        return jnp.where(inside, v, 0.0)

    nw = (x1 - ix) * (y1 - iy)
    ne = (ix - x0) * (y1 - iy)
    sw = (x1 - ix) * (iy - y0)
    se = (ix - x0) * (iy - y0)
    return tap(x0, y0) * nw + tap(x1, y0) * ne + tap(x0, y1) * sw + tap(x1, y1) * se


def draw_point_uniforms(key: jax.Array, lead_shape: Sequence[int],
                        cfg: CriterionConfig = CriterionConfig()) -> tuple[jax.Array, jax.Array]:
    """U1 [..., 37632, 2] and U2 [..., 3136, 2] ~ U[0, 1) for one mask call."""
    k1, k2 = jax.random.split(key)
    u1 = jax.random.uniform(k1, (*lead_shape, cfg.num_oversampled, 2), jnp.float32)
    u2 = jax.random.uniform(k2, (*lead_shape, cfg.num_random, 2), jnp.float32)
    return u1, u2


@partial(jax.jit, static_argnames="num_uncertain")
def importance_points(mask_logits: jax.Array, u1: jax.Array, u2: jax.Array,
                      num_uncertain: int = int(IMPORTANCE_SAMPLE_RATIO * NUM_POINTS)) -> jax.Array:
    """PointRend ``get_uncertain_point_coords_with_randomness`` with given uniforms (§T8).

    mask_logits [N, h, w], u1 [N, P_over, 2], u2 [N, P_rand, 2] -> [N, num_uncertain + P_rand, 2]:
    the ``num_uncertain`` points of U1 with the highest uncertainty −|logit| (descending, like
    ``torch.topk``), then U2. No gradient flows into the coordinates.
    """
    logits = jax.lax.stop_gradient(point_sample(mask_logits, u1))   # [N, P_over]
    _, idx = jax.lax.top_k(-jnp.abs(logits), num_uncertain)         # [N, num_uncertain]
    chosen = jnp.take_along_axis(u1, idx[..., None], axis=1)
    return jnp.concatenate([chosen, u2], axis=1)


# ------------------------------------------------------------------------------------- one criterion call

def _gather_pairs(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, Q, ...], idx [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@jax.jit
def label_loss(logits: jax.Array, idx_src: jax.Array, idx_tgt: jax.Array, valid: jax.Array,
               positive_map: jax.Array) -> jax.Array:
    """``loss_ce`` of one call: Y[b, src] = positive_map[b, tgt]; focal summed over everything / N.

    logits [B, Q, T], idx_* / valid [B, K], positive_map [B, G, T].
    """
    b = logits.shape[0]
    rows = _gather_pairs(positive_map.astype(logits.dtype), idx_tgt) * valid[..., None]  # [B, K, T]
    y = jnp.zeros_like(logits).at[jnp.arange(b)[:, None], idx_src].max(rows)
    return L.token_focal_loss(logits, y, jnp.sum(valid))


@jax.jit
def box_losses(boxes: jax.Array, idx_src: jax.Array, idx_tgt: jax.Array, valid: jax.Array,
               gt_boxes: jax.Array, boxious: jax.Array | None = None) -> dict[str, jax.Array]:
    """``loss_bbox``, ``loss_giou`` (+ ``loss_boxiou`` when IoU logits are given) of one call."""
    num = jnp.sum(valid)
    src = _gather_pairs(boxes, idx_src).reshape(-1, 4)
    tgt = _gather_pairs(gt_boxes, idx_tgt).reshape(-1, 4)
    v = valid.reshape(-1)
    out = {"loss_bbox": L.l1_box_loss(src, tgt, v, num),
           "loss_giou": L.giou_box_loss(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), v, num)}
    if boxious is not None:
        iou_logit = _gather_pairs(boxious[..., 0], idx_src).reshape(-1)
        out["loss_boxiou"] = L.boxiou_loss(iou_logit, box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), v, num)
    return out


@jax.jit
def mask_losses(pred_masks: jax.Array, idx_tgt: jax.Array, valid: jax.Array, gt_masks_ds: jax.Array,
                points: jax.Array) -> dict[str, jax.Array]:
    """``loss_mask`` (point focal) and ``loss_dice`` of one call (§T7, §T8).

    pred_masks [B, K, h, w] logits of the matched pairs, gt_masks_ds [B, G, h, w] (:func:`downsample_gt_masks`),
    points [B, K, P, 2].
    """
    b, k, h, w = pred_masks.shape
    tgt = _gather_pairs(gt_masks_ds, idx_tgt).reshape(b * k, h, w)
    pts = points.reshape(b * k, -1, 2)
    labels = jax.lax.stop_gradient(point_sample(tgt, pts))
    logits = point_sample(pred_masks.reshape(b * k, h, w), pts)
    v = valid.reshape(-1)
    num = jnp.sum(valid)
    return {"loss_mask": L.mask_focal_loss(logits, labels, v, num),
            "loss_dice": L.dice_loss(logits, labels, v, num)}


# ------------------------------------------------------------------------------------------ full criterion

class GroupOutputs(NamedTuple):
    """Decoder-head outputs of one query group, stacked over layers (last = final layer)."""
    logits: jax.Array                 # [L, B, Qg, T]
    boxes: jax.Array                  # [L, B, Qg, 4] cxcywh
    boxious: jax.Array | None = None  # [L or L-1, B, Qg, 1] IoU logits; only layers 0..L-2 are used
    masks: jax.Array | None = None    # [L, B, K, h, w] mask logits of the matched pairs (index order)


class EncOutputs(NamedTuple):
    logits: jax.Array  # [B, S, 1] Still_Classifier logits
    boxes: jax.Array   # [B, S, 4] sigmoid(enc_coord_unact), cxcywh


class CriterionOutput(NamedTuple):
    raw: dict[str, jax.Array]        # merged unweighted dict (fg·1 + bg·0 + gt·1)
    weighted: dict[str, jax.Array]   # raw × weight_dict × LOSS_WEIGHT_DET (weight 1 when not listed)
    per_group: dict[str, dict[str, jax.Array]]  # unweighted dict of each call: 'fg', 'bg', 'gt'
    prompt_l2: jax.Array             # 1e-3 · mean(prompt²)
    total: jax.Array                 # Σ weighted + prompt_l2


def _layer_key(name: str, layer: int, final: int) -> str:
    return name if layer == final else f"{name}_{layer}"


def _dn_placeholders(num_layers: int) -> dict[str, jax.Array]:
    out = {k: jnp.zeros((), jnp.float32) for k in DN_PLACEHOLDER_KEYS}
    for i in range(num_layers - 1):
        out.update({f"{k}_{i}": jnp.zeros((), jnp.float32) for k in DN_PLACEHOLDER_KEYS})
    return out


def _call_points(group: str, layer: int, masks: jax.Array, *, points: Mapping[str, jax.Array] | None,
                 draws: Mapping[str, tuple[jax.Array, jax.Array]] | None, key: jax.Array | None,
                 cfg: CriterionConfig) -> jax.Array:
    """Final sample points [B, K, P, 2] of mask call ``{group}_l{layer}``: given, replayed from U1/U2, or drawn."""
    name = f"{group}_l{layer}"
    if points is not None and name in points:
        return jnp.asarray(points[name])
    b, k, h, w = masks.shape
    if draws is not None and name in draws:
        u1, u2 = (jnp.asarray(u) for u in draws[name])
    else:
        if key is None:
            raise ValueError(f"hipie_criterion: mask call {name!r} needs a PRNG key, stored draws or points.")
        u1, u2 = draw_point_uniforms(key, (b, k), cfg)
    pts = importance_points(masks.reshape(b * k, h, w), u1.reshape(b * k, -1, 2), u2.reshape(b * k, -1, 2),
                            cfg.num_uncertain)
    return pts.reshape(b, k, -1, 2)


def group_losses(group: str, out: GroupOutputs, idx: PaddedIndices, targets: HipieTargets, *,
                 gt_masks_ds: jax.Array | None = None, key: jax.Array | None = None,
                 points: Mapping[str, jax.Array] | None = None,
                 draws: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
                 cfg: CriterionConfig = CriterionConfig()) -> dict[str, jax.Array]:
    """Unweighted losses of one criterion call over all layers (final + aux), without ``_enc``/DN placeholders.

    idx fields are [L, B, K]. Layer order of the mask calls (and of the split keys): final, then aux 0..L-2,
    as in the original.
    """
    n_layers = out.logits.shape[0]
    final = n_layers - 1
    if gt_masks_ds is None and out.masks is not None:
        gt_masks_ds = downsample_gt_masks(targets.masks, cfg.mask_out_stride)
    keys = list(jax.random.split(key, n_layers)) if key is not None else [None] * n_layers
    losses: dict[str, jax.Array] = {}
    for i, layer in enumerate([final, *range(final)]):
        src, tgt, valid = idx.src[layer], idx.tgt[layer], idx.valid[layer]
        d = {"loss_ce": label_loss(out.logits[layer], src, tgt, valid, targets.positive_map)}
        bi = out.boxious[layer] if (out.boxious is not None and layer < final) else None
        d.update(box_losses(out.boxes[layer], src, tgt, valid, targets.boxes, bi))
        if out.masks is not None:
            pts = _call_points(group, layer, out.masks[layer], points=points, draws=draws, key=keys[i], cfg=cfg)
            d.update(mask_losses(out.masks[layer], tgt, valid, gt_masks_ds, pts))
        losses.update({_layer_key(k, layer, final): v for k, v in d.items()})
    return losses


@jax.jit
def encoder_losses(enc: EncOutputs, idx: PaddedIndices, targets: HipieTargets) -> dict[str, jax.Array]:
    """``_enc`` terms (§T5, §T7): binary targets (positive map = ones [G, 1]), ce/bbox/giou only; idx [B, K]."""
    ones = jnp.ones(targets.positive_map.shape[:2] + (1,), jnp.float32)
    d = {"loss_ce": label_loss(enc.logits, idx.src, idx.tgt, idx.valid, ones)}
    d.update(box_losses(enc.boxes, idx.src, idx.tgt, idx.valid, targets.boxes))
    return {f"{k}_enc": v for k, v in d.items()}


def bg_losses(out: GroupOutputs) -> dict[str, jax.Array]:
    """bg call against empty targets: every term is ``0 · Σ(prediction)`` (zero, but NaN-propagating)."""
    n_layers = out.logits.shape[0]
    final = n_layers - 1
    losses = {}
    for layer in range(n_layers):
        zc = 0.0 * jnp.sum(out.logits[layer])
        zb = 0.0 * jnp.sum(out.boxes[layer])
        d = {"loss_ce": zc, "loss_bbox": zb, "loss_giou": zb}
        if out.masks is not None:
            zm = 0.0 * jnp.sum(out.masks[layer])
            d.update({"loss_mask": zm, "loss_dice": zm})
        losses.update({_layer_key(k, layer, final): v for k, v in d.items()})
    return losses


def merge_groups(dicts: Sequence[Mapping[str, jax.Array]], weights: Sequence[float]) -> dict[str, jax.Array]:
    """``merge_dict`` (§T9): value = Σ_group w_group · value_group, over the union of keys."""
    merged: dict[str, jax.Array] = {}
    for d, w in zip(dicts, weights, strict=True):
        for k, v in d.items():
            merged[k] = merged[k] + v * w if k in merged else v * w
    return merged


def apply_weights(raw: Mapping[str, jax.Array], cfg: CriterionConfig = CriterionConfig()) -> dict[str, jax.Array]:
    """SegLLM weighting (§T9): keys in ``weight_dict`` × weight × LOSS_WEIGHT_DET; others unchanged."""
    wd = weight_dict(cfg)
    return {k: (v * (wd[k] * cfg.loss_weight_det) if k in wd else v) for k, v in raw.items()}


def hipie_criterion(fg: GroupOutputs, fg_indices: PaddedIndices, dn: GroupOutputs, dn_indices: PaddedIndices,
                    enc: EncOutputs, enc_indices: PaddedIndices, targets: HipieTargets, prompts: jax.Array, *,
                    bg: GroupOutputs | None = None, key: jax.Array | None = None,
                    points: Mapping[str, jax.Array] | None = None,
                    draws: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
                    cfg: CriterionConfig = CriterionConfig()) -> CriterionOutput:
    """Full SegLLM/HIPIE training loss of one step (§T7 to §T10).

    fg / dn: group outputs with masks of their matched pairs; *_indices [L, B, K] (enc: [B, K]);
    prompts [n, 8, 768] (for the L2 term). Mask sample points per call ``'{fg|gt}_l{layer}'`` come from
    ``points`` (final points [B, K, P, 2]), else ``draws`` ((U1, U2) [B, K, ·, 2]), else ``key``.
    """
    gt_ds = downsample_gt_masks(targets.masks, cfg.mask_out_stride)
    k_fg = k_dn = None
    if key is not None:
        k_fg, k_dn = jax.random.split(key)
    n_layers = fg.logits.shape[0]
    fg_d = group_losses("fg", fg, fg_indices, targets, gt_masks_ds=gt_ds, key=k_fg, points=points,
                        draws=draws, cfg=cfg)
    fg_d.update(_dn_placeholders(n_layers))
    gt_d = group_losses("gt", dn, dn_indices, targets, gt_masks_ds=gt_ds, key=k_dn, points=points,
                        draws=draws, cfg=cfg)
    gt_d.update(encoder_losses(enc, enc_indices, targets))
    gt_d.update(_dn_placeholders(n_layers))
    dicts, weights, per_group = [fg_d], [cfg.fg_weight], {"fg": fg_d, "gt": gt_d}
    if bg is not None:
        bg_d = bg_losses(bg)
        bg_d.update(_dn_placeholders(n_layers))
        dicts.append(bg_d)
        weights.append(cfg.bg_weight)
        per_group["bg"] = bg_d
    dicts.append(gt_d)
    weights.append(cfg.gt_weight)
    raw = merge_groups(dicts, weights)
    weighted = apply_weights(raw, cfg)
    l2 = L.prompt_l2_loss(prompts, cfg.prompt_l2_weight)
    total = sum(weighted.values()) + l2
    return CriterionOutput(raw=raw, weighted=weighted, per_group=per_group, prompt_l2=l2, total=total)


def iou_train_metric(last_fg_mask_logits: jax.Array, target_masks: jax.Array) -> jax.Array:
    """SegLLM's ``iou_train`` metric (§T10, not part of the loss): per prompt the last matched fg query's
    final-layer mask, bilinearly up-sampled to the frame, > 0, vs the target mask; IoU pooled over prompts.

    last_fg_mask_logits [B, h, w], target_masks [B, H, W].
    """
    b = last_fg_mask_logits.shape[0]
    h, w = target_masks.shape[-2:]
    up = jax.image.resize(last_fg_mask_logits.astype(jnp.float32), (b, h, w), "bilinear", antialias=False)
    pred = up > 0
    tgt = target_masks > 0
    inter = jnp.sum(pred & tgt)
    union = jnp.sum(pred | tgt)
    return inter / (union + 1e-4)
