"""SegLLM's HIPIE mask-decoder loss of one training step, end to end and jit-able (architecture.md §T1 to §T10).

:func:`hipie_loss` chains, all on device except the assignment:

1. GT per prompt (§T1) on device (:func:`device_targets`, the jit-able twin of
   :func:`~segllm_jax.train.criterion.segllm_targets`): G = ``options.max_gt`` (2) GT slots, valid first.
2. DN queries (§T2): ``detr.resizer`` label content, noisy GT boxes, DINO attention mask
   (:func:`~segllm_jax.train.denoising.prepare_dn_queries`).
3. Training forward (:func:`~segllm_jax.models.hipie.training.training_forward`): fusion dropout, every
   decoder layer's heads for the fg / bg / DN groups, encoder proposals.
4. Matching (§T4, §T5): cost matrices on device (the matcher's jnp costs), assignment on the host through one
   ``jax.pure_callback`` (simOTA per layer for fg, scipy Hungarian for the encoder proposals) returning padded
   indices of static shape; DN indices are fixed (§T6). No gradient flows through the indices (the original
   matches under ``no_grad``).
5. Masks of the matched pairs only (CondInst head, §T3), point sampling and :func:`hipie_criterion` (§T7 to §T9).

**Static shapes vs. the original's batch-dependent DN padding.** The original pads the DN group to 2M slots,
M = the batch's actual maximum GT count. Here the slots are always 2G (G = ``max_gt``); when the batch maximum
M < G the extra slots (j >= M in each half) are hidden as attention keys (they would not exist in the
original) and their logits are pushed to -1e4, so they add exactly 0 to the DN focal sum. The real slots then
see exactly what they see in the original (self-attention ignores slot order; everything else is per query).

**Loss value.** ``loss`` = Σ of the weighted criterion terms (§T9) *without* the prompt L2 term: the SegLLM
train step adds ``1e-3 · mean(prompt²)`` itself (it is reported as ``metrics['prompt_l2']`` for logging only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.optimize import linear_sum_assignment

from segllm_jax.models.hipie.image_side import LevelInputs
from segllm_jax.models.hipie.model import Hipie
from segllm_jax.models.hipie.training import DNLabelEncoder, TrainingOutputs, training_forward, training_mask_logits
from segllm_jax.train.box_ops import boxes_from_masks
from segllm_jax.train.criterion import (
    CriterionConfig,
    CriterionOutput,
    EncOutputs,
    GroupOutputs,
    HipieTargets,
    hipie_criterion,
    iou_train_metric,
)
from segllm_jax.train.denoising import BOX_NOISE_SCALE, DNQueries, prepare_dn_queries
from segllm_jax.train.matcher import (
    OTA_CANDIDATES,
    MatcherCosts,
    PaddedIndices,
    dynamic_k_matching,
    hungarian_cost,
    ota_cost,
)

EXTRA_DN_LOGIT = -1e4  # FL(-1e4, 0) == 0 exactly in float32, and its gradient too


@dataclass(frozen=True)
class HipieLossOptions:
    """Static knobs of :func:`hipie_loss` (hashable: pass through ``static_argnames``)."""

    box_noise_scale: float = BOX_NOISE_SCALE  # 0: DN boxes = GT (golden 'det' variant)
    fusion_dropout: bool = True  # VL-fusion attention dropout p = 0.1 (training mode)
    max_gt: int = 2  # GT slots per prompt (reference + target)
    k_fg: int | None = None  # padded fg matches per prompt; default OTA_CANDIDATES · max_gt (never truncates)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    costs: MatcherCosts = field(default_factory=MatcherCosts)
    ranking_weight: float = 0.0  # training aid, not in the original: see target_ranking_loss

    @property
    def fg_slots(self) -> int:
        return self.k_fg if self.k_fg is not None else OTA_CANDIDATES * self.max_gt


class HipieReplay(NamedTuple):
    """Recorded randomness / selections to replay (golden tests); every field optional."""

    dn_draws: tuple[jax.Array, jax.Array] | None = None  # (sign01, part) [2, B, G, 4] (denoising layout)
    fusion_keep: tuple[jax.Array, jax.Array] | None = None  # (keep_v [B,H,S,T], keep_l [B,H,T,S])
    points: Mapping[str, jax.Array] | None = None  # final points '{fg|gt}_l{layer}' -> [B, K, P, 2]
    draws: Mapping[str, tuple[jax.Array, jax.Array]] | None = None  # (U1, U2) per mask call, [B, K, ., 2]
    topk_indices: jax.Array | None = None  # [B, Qfg] forced two-stage order


class HipieLossDetails(NamedTuple):
    loss: jax.Array
    metrics: dict[str, jax.Array]
    forward: TrainingOutputs
    targets: HipieTargets
    dn: DNQueries
    fg_indices: PaddedIndices  # [L, B, K_fg], fg-relative query indices
    dn_indices: PaddedIndices  # [L, B, G]
    enc_indices: PaddedIndices  # [B, G], token indices
    fg_masks: jax.Array  # [L, B, K_fg, H/4, W/4]
    dn_masks: jax.Array  # [L, B, G, H/4, W/4]
    criterion: CriterionOutput


# ------------------------------------------------------------------------------------------------- targets

def device_targets(target_masks: jax.Array, aux_masks: jax.Array, has_aux: jax.Array, num_tokens: int = 8,
                   max_gt: int = 2) -> HipieTargets:
    """SegLLM GT (§T1) on device. target_masks / aux_masks [B, H, W], has_aux [B] bool.

    A prompt whose reference (``aux``) mask is flagged *and* non-empty gets [reference (tokens 0..T/2-1),
    target (tokens T/2..T-1)], otherwise [target (tokens T/2..)]. Boxes (x0, y0, x1+1, y1+1)/(W,H,W,H) -> cxcywh.
    """
    if max_gt != 2:
        raise ValueError("device_targets: SegLLM has at most 2 GT per prompt (reference + target)")
    tgt = target_masks > 0
    aux = aux_masks > 0
    b, h, w = tgt.shape
    two = jnp.asarray(has_aux, bool) & jnp.any(aux, axis=(-2, -1))  # [B]
    half = num_tokens // 2
    tok = jnp.arange(num_tokens)
    ref_row = (tok < half).astype(jnp.float32)
    tgt_row = (tok >= half).astype(jnp.float32)
    masks0 = jnp.where(two[:, None, None], aux, tgt)
    masks1 = jnp.where(two[:, None, None], tgt, False)
    masks = jnp.stack([masks0, masks1], axis=1).astype(jnp.float32)  # [B, 2, H, W]
    pmap = jnp.stack([jnp.where(two[:, None], ref_row, tgt_row),
                      jnp.where(two[:, None], tgt_row, 0.0)], axis=1)  # [B, 2, T]
    valid = jnp.stack([jnp.ones((b,), bool), two], axis=1)  # [B, 2]
    xyxy = boxes_from_masks(masks) / jnp.asarray([w, h, w, h], jnp.float32)
    boxes = jnp.concatenate([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], -1)
    return HipieTargets(boxes=boxes, positive_map=pmap, valid=valid, masks=masks)


# ------------------------------------------------------------------------------------------------ matching

def _host_assign(fg_cost: np.ndarray, fg_iou: np.ndarray, enc_cost: np.ndarray, counts: np.ndarray,
                 k_fg: int) -> tuple[np.ndarray, ...]:
    """simOTA per (layer, prompt) + Hungarian per prompt on the host -> padded int32 / bool arrays."""
    n_layers, b, _, g = fg_cost.shape
    fs = np.zeros((n_layers, b, k_fg), np.int32)
    ft = np.zeros((n_layers, b, k_fg), np.int32)
    fv = np.zeros((n_layers, b, k_fg), bool)
    for layer in range(n_layers):
        for i in range(b):
            n = int(counts[i])
            src, tgt = dynamic_k_matching(fg_cost[layer, i][:, :n], fg_iou[layer, i][:, :n])
            if len(src) > k_fg:  # only when options.k_fg was lowered below the simOTA bound
                src, tgt = src[:k_fg], tgt[:k_fg]
            fs[layer, i, :len(src)], ft[layer, i, :len(src)], fv[layer, i, :len(src)] = src, tgt, True
    es = np.zeros((b, g), np.int32)
    et = np.zeros((b, g), np.int32)
    ev = np.zeros((b, g), bool)
    for i in range(b):
        n = int(counts[i])
        src, tgt = linear_sum_assignment(enc_cost[i][:, :n])
        es[i, :len(src)], et[i, :len(src)], ev[i, :len(src)] = src, tgt, True
    return fs, ft, fv, es, et, ev


def match_on_host(fwd: TrainingOutputs, targets: HipieTargets, k_fg: int,
                  costs: MatcherCosts = MatcherCosts()) -> tuple[PaddedIndices, PaddedIndices]:
    """fg simOTA indices [L, B, k_fg] and encoder Hungarian indices [B, G] (§T4, §T5) via ``pure_callback``.

    Costs are built on device from stop-gradient predictions; the callback only runs the assignment.
    """
    logits, boxes, _ = fwd.group("fg")
    logits, boxes = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(boxes)
    gt_boxes, pmap, valid = targets.boxes, targets.positive_map, targets.valid
    per_prompt = jax.vmap(ota_cost, in_axes=(0, 0, 0, 0, 0))
    fg_cost, fg_iou = jax.vmap(per_prompt, in_axes=(0, 0, None, None, None))(logits, boxes, gt_boxes, pmap, valid)
    ones = jnp.ones(gt_boxes.shape[:2] + (1,), jnp.float32)
    enc_cost = jax.vmap(lambda lg, bx, gb, pm, v: hungarian_cost(lg, bx, gb, pm, costs, v))(
        jax.lax.stop_gradient(fwd.enc_logits), jax.lax.stop_gradient(fwd.enc_boxes), gt_boxes, ones, valid)
    counts = jnp.sum(valid, axis=1).astype(jnp.int32)
    n_layers, b = logits.shape[:2]
    g = gt_boxes.shape[1]
    shapes = (jax.ShapeDtypeStruct((n_layers, b, k_fg), jnp.int32),) * 2 + \
        (jax.ShapeDtypeStruct((n_layers, b, k_fg), jnp.bool_),) + \
        (jax.ShapeDtypeStruct((b, g), jnp.int32),) * 2 + (jax.ShapeDtypeStruct((b, g), jnp.bool_),)
    fs, ft, fv, es, et, ev = jax.pure_callback(
        lambda c, i, e, n: _host_assign(np.asarray(c), np.asarray(i), np.asarray(e), np.asarray(n), k_fg),
        shapes, fg_cost, fg_iou, enc_cost, counts)
    return PaddedIndices(fs, ft, fv), PaddedIndices(es, et, ev)


def dn_indices(valid: jax.Array, num_layers: int) -> PaddedIndices:
    """Fixed DN indices (§T6): src = tgt = j for every valid GT j; [L, B, G]."""
    b, g = valid.shape
    ar = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32), (num_layers, b, g))
    return PaddedIndices(ar, ar, jnp.broadcast_to(valid, (num_layers, b, g)))


def hide_extra_dn_slots(dn: DNQueries, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(attention mask [B, 1, Qt, Qt], extra-slot flag [pad]) for slots beyond the batch's actual max GT."""
    g = valid.shape[1]
    m_act = jnp.max(jnp.sum(valid, axis=1))
    slot = jnp.arange(dn.pad_size)
    extra = (slot % g) >= m_act  # [pad]
    qt = dn.attn_mask.shape[0]
    cols = jnp.zeros((qt,), bool).at[:dn.pad_size].set(extra)
    return (dn.attn_mask | cols[None, :])[None, None], extra


# ------------------------------------------------------------------------------------------------- the loss

def hipie_loss_details(hipie: Hipie, dn_resizer: DNLabelEncoder, levels: LevelInputs, prompts: jax.Array,
                       image_index: jax.Array | None, target_masks: jax.Array, aux_masks: jax.Array, has_aux: jax.Array,
                       key: jax.Array | None, *, options: HipieLossOptions = HipieLossOptions(),
                       replay: HipieReplay | None = None) -> HipieLossDetails:
    """:func:`hipie_loss` with every intermediate (tests, debugging). Same arguments."""
    cfg = hipie.cfg
    crit_cfg = options.criterion
    if crit_cfg.dec_layers != cfg.dec_layers:  # aux-loss keys follow the model's decoder depth
        crit_cfg = dataclasses.replace(crit_cfg, dec_layers=cfg.dec_layers)
    replay = replay if replay is not None else HipieReplay()
    k_dn = k_drop = k_pts = None
    if key is not None:
        k_dn, k_drop, k_pts = jax.random.split(key, 3)
    targets = device_targets(target_masks, aux_masks, has_aux, cfg.prompt_tokens, options.max_gt)

    # §T2 DN queries
    label_enc = dn_resizer(prompts)  # [B, 256]
    dn = prepare_dn_queries(targets.boxes, targets.valid, label_enc,
                            num_queries=cfg.num_bg_queries + cfg.num_queries,
                            key=k_dn if replay.dn_draws is None else None, draws=replay.dn_draws,
                            box_noise_scale=options.box_noise_scale)
    attn_mask, extra = hide_extra_dn_slots(dn, targets.valid)

    # §T3 forward (training mode)
    deterministic = not options.fusion_dropout
    rngs = nnx.Rngs(dropout=k_drop) if (not deterministic and replay.fusion_keep is None and k_drop is not None) \
        else None
    fwd = training_forward(hipie, levels, prompts, image_index, dn.label, dn.bbox_logit, attn_mask,
                           deterministic=deterministic, rngs=rngs, fusion_dropout_keep=replay.fusion_keep,
                           topk_indices=replay.topk_indices)
    n_layers = fwd.hs.shape[0]

    # §T4 to §T6 matching (host) + fixed DN indices
    fg_idx, enc_idx = match_on_host(fwd, targets, options.fg_slots, options.costs)
    gt_idx = dn_indices(targets.valid, n_layers)

    # §T3 masks of the matched pairs, group outputs
    fg_masks = training_mask_logits(hipie, fwd, "fg", fg_idx.src)
    dn_masks = training_mask_logits(hipie, fwd, "dn", gt_idx.src)
    fl, fb, fi = fwd.group("fg")
    dl, db, _ = fwd.group("dn")
    dl = jnp.where(extra[None, None, :, None], EXTRA_DN_LOGIT, dl)
    bl, bb, _ = fwd.group("bg")
    fg = GroupOutputs(fl, fb, fi, fg_masks)
    dn_group = GroupOutputs(dl, db, None, dn_masks)
    bg = GroupOutputs(bl, bb, None, None)
    enc = EncOutputs(fwd.enc_logits, fwd.enc_boxes)

    # §T7 to §T9 criterion
    crit = hipie_criterion(fg, fg_idx, dn_group, gt_idx, enc, enc_idx, targets, prompts, bg=bg,
                           key=k_pts, points=replay.points, draws=replay.draws, cfg=crit_cfg)
    loss = sum(crit.weighted.values())
    extra_metrics = {}
    if options.ranking_weight:
        rank = target_ranking_loss(fl, fg_idx, targets.positive_map)
        loss = loss + options.ranking_weight * rank
        extra_metrics["loss_rank"] = jax.lax.stop_gradient(rank)

    # iou_train (§T10): last matched fg query of the final layer, per prompt
    last = fg_masks[-1]  # [B, K, h, w]
    pos = jnp.maximum(jnp.sum(fg_idx.valid[-1], axis=1) - 1, 0)  # [B]
    last_logits = jnp.take_along_axis(last, pos[:, None, None, None], axis=1)[:, 0]
    iou = iou_train_metric(jax.lax.stop_gradient(last_logits), target_masks)
    metrics = {k: jax.lax.stop_gradient(v) for k, v in crit.weighted.items()}
    metrics.update(loss_hipie=jax.lax.stop_gradient(loss), prompt_l2=jax.lax.stop_gradient(crit.prompt_l2),
                   iou_train=iou, **extra_metrics)
    return HipieLossDetails(loss=loss, metrics=metrics, forward=fwd, targets=targets, dn=dn, fg_indices=fg_idx,
                            dn_indices=gt_idx, enc_indices=enc_idx, fg_masks=fg_masks, dn_masks=dn_masks,
                            criterion=crit)


def target_ranking_loss(fg_logits: jax.Array, fg_indices: PaddedIndices, positive_map: jax.Array) -> jax.Array:
    """A training aid (``TrainConfig.ranking_loss_weight``; the original has no such term): softmax
    cross-entropy over a prompt's foreground queries that the ones matched to its *target* have the
    highest target score, averaged over decoder layers and prompts.

    Why: inference answers with the query of highest target score, a choice *between* queries. The
    focal class loss scores each query on its own; with the 0.01 prior every other shape's query is an
    easy negative whose gradient the focal factor all but removes, so from scratch the cheapest way
    down is a logit that tracks "is a good box" rather than "is the shape this prompt names". This term
    compares the target's queries with the others directly (several matched queries count as one
    positive set: log-sum-exp of all minus log-sum-exp of the positives).

    fg_logits [L, B, Q, T] token logits (target = tokens T/2.., scored by their mean as inference does);
    fg_indices [L, B, K] matched pairs; positive_map [B, G, T] from :func:`device_targets`.
    """
    half = fg_logits.shape[-1] // 2
    score = jnp.mean(fg_logits[..., half:].astype(jnp.float32), axis=-1)  # [L, B, Q]
    target_slot = jnp.argmax(positive_map[:, :, half], axis=1)  # [B] the GT slot holding the target tokens
    is_target = fg_indices.valid & (fg_indices.tgt == target_slot[None, :, None])  # [L, B, K]
    layers, batch, queries = score.shape
    rows = jnp.arange(layers)[:, None, None], jnp.arange(batch)[None, :, None]
    positive = jnp.zeros(score.shape, bool).at[rows[0], rows[1], fg_indices.src].max(is_target)  # [L, B, Q]
    has = positive.any(-1)
    lse_all = jax.nn.logsumexp(score, axis=-1)
    lse_pos = jax.nn.logsumexp(jnp.where(positive, score, -jnp.inf), axis=-1)
    per = jnp.where(has, lse_all - jnp.where(has, lse_pos, 0.0), 0.0)
    return per.sum() / jnp.maximum(has.sum(), 1)


def hipie_loss(hipie: Hipie, dn_resizer: DNLabelEncoder, levels: LevelInputs, prompts: jax.Array,
               image_index: jax.Array | None, target_masks: jax.Array, aux_masks: jax.Array, has_aux: jax.Array,
               key: jax.Array | None, *,
               options: HipieLossOptions = HipieLossOptions(),
               replay: HipieReplay | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SegLLM's HIPIE training loss of one step (architecture.md §T1 to §T10) -> (loss, metrics).

    hipie: the inference ``Hipie``; dn_resizer: its training-only DN label encoder (``detr.resizer``, §T2);
    levels: ``Hipie.image_features`` of the I images; prompts [B, 8, 768] (raw LLM prompt embeddings, the
    kept rounds); image_index [B] (image row per prompt, None = row b); target_masks / aux_masks [B, H, W]
    (padded frame, H = W = S); has_aux [B] bool (round has a reference mask); key: PRNG key for DN noise,
    fusion dropout and point sampling (may be None when ``replay`` supplies every draw).

    ``loss`` = Σ weighted criterion terms, **without** the prompt L2 (the train step adds
    ``1e-3 · mean(prompt²)``; it is in ``metrics['prompt_l2']``). ``metrics``: every weighted term (keys of the
    original's loss dict), ``loss_hipie`` (= loss), ``prompt_l2`` and ``iou_train``. Differentiable w.r.t. the
    HIPIE parameters and ``prompts``; jit-able (options static).
    """
    d = hipie_loss_details(hipie, dn_resizer, levels, prompts, image_index, target_masks, aux_masks, has_aux, key,
                           options=options, replay=replay)
    return d.loss, d.metrics


__all__ = ["HipieLossDetails", "HipieLossOptions", "HipieReplay", "device_targets", "dn_indices",
           "hide_extra_dn_slots", "hipie_loss", "hipie_loss_details", "match_on_host", "target_ranking_loss"]
