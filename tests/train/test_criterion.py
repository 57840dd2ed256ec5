"""HIPIE training criterion: golden criterion-only reproduction + hand-made float64 NumPy checks.

Golden part (``@pytest.mark.golden``): every ``train_seed*_256.npz`` of the folder ``SEGLLM_GOLDEN_HIPIE``
(default ``<repo>/../shared/golden/hipie``, resolved from this file). For both variants (``det``, ``rand``)
the stored predictions, targets, indices and sample points are fed to the criterion; every loss term must
be within rel 1e-5 of the original (README "Noise floor"), and the matchers must reproduce the stored
simOTA / Hungarian indices exactly from the stored predictions. The prompts for the L2 term come from the
matching inference file ``seed<N>_256.npz`` when present (else the stored L2 value is used).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segllm_jax.train import losses as L
from segllm_jax.train.box_ops import box_cxcywh_to_xyxy
from segllm_jax.train.criterion import (
    EncOutputs,
    GroupOutputs,
    HipieTargets,
    downsample_gt_masks,
    hipie_criterion,
    importance_points,
    iou_train_metric,
    mask_losses,
    point_sample,
    segllm_targets,
    weight_dict,
)
from segllm_jax.train.denoising import (
    dn_attention_mask,
    dn_match_indices,
    flat_draws_to_padded,
    prepare_dn_queries,
)
from segllm_jax.train.matcher import (
    PaddedIndices,
    dynamic_k_matching,
    encoder_match,
    pad_indices,
    pad_layer_indices,
    simota_match,
)

from .golden import golden_params, pad_rows

REL_TOL = 1e-5


GOLDEN = golden_params()


# ------------------------------------------------------------------------------------- golden plumbing

@lru_cache(maxsize=2)
def _load(path: Path) -> dict[str, np.ndarray]:
    return dict(np.load(path))


def _targets(d: dict) -> HipieTargets:
    return segllm_targets(d["gt_target_masks"], d["gt_prev_masks"])


def _num_layers(d: dict, v: str) -> int:
    return sum(1 for k in d if k.startswith(f"{v}_out_fg_l") and k.endswith("_pred_logits"))


def _stored_indices(d: dict, v: str, g: str, n_layers: int, batch: int) -> PaddedIndices:
    return pad_layer_indices([[(d[f"{v}_idx_{g}_l{layer}_b{b}_src"], d[f"{v}_idx_{g}_l{layer}_b{b}_tgt"])
                               for b in range(batch)] for layer in range(n_layers)])


def _group(d: dict, v: str, g: str, idx: PaddedIndices, n_layers: int, batch: int) -> GroupOutputs:
    k = idx.src.shape[-1]
    masks = np.zeros((n_layers, batch, k) + d[f"{v}_out_{g}_l0_b0_pred_masks"].shape[1:], np.float32)
    for layer in range(n_layers):
        for b in range(batch):
            m = d[f"{v}_out_{g}_l{layer}_b{b}_pred_masks"]
            masks[layer, b, : len(m)] = m
    logits = np.stack([d[f"{v}_out_{g}_l{layer}_pred_logits"] for layer in range(n_layers)])
    boxes = np.stack([d[f"{v}_out_{g}_l{layer}_pred_boxes"] for layer in range(n_layers)])
    ious = [d[f"{v}_out_{g}_l{layer}_pred_boxious"] for layer in range(n_layers)
            if f"{v}_out_{g}_l{layer}_pred_boxious" in d]
    return GroupOutputs(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(np.stack(ious)) if ious else None,
                        jnp.asarray(masks))


def _stored_points(d: dict, v: str, g: str, idx: PaddedIndices, n_layers: int) -> dict[str, np.ndarray]:
    """``{v}_points_{g}_call{c}``: c = 0 final layer, c = 1.. aux layers 0.. -> {'{g}_l{layer}': [B, K, P, 2]}."""
    out = {}
    for c in range(n_layers):
        layer = n_layers - 1 if c == 0 else c - 1
        counts = np.asarray(idx.valid[layer]).sum(1)
        out[f"{g}_l{layer}"] = pad_rows(d[f"{v}_points_{g}_call{c}"], counts, idx.src.shape[-1])
    return out


def _prompts(path: Path, d: dict) -> np.ndarray | None:
    inf = path.parent / f"seed{int(d['seed'])}_256.npz"
    if not inf.is_file():
        return None
    with np.load(inf) as z:
        return z["prompts"]


@lru_cache(maxsize=4)
def _run_golden(path: Path, v: str):
    """Criterion-only run on stored predictions / indices / points. Cached: several tests read it."""
    d = _load(path)
    tg = _targets(d)
    n_layers, batch = _num_layers(d, v), tg.boxes.shape[0]
    fi = _stored_indices(d, v, "fg", n_layers, batch)
    gi = _stored_indices(d, v, "gt", n_layers, batch)
    ei = pad_indices([(d[f"{v}_idx_enc_b{b}_src"], d[f"{v}_idx_enc_b{b}_tgt"]) for b in range(batch)])
    fg = _group(d, v, "fg", fi, n_layers, batch)
    dn = _group(d, v, "gt", gi, n_layers, batch)
    enc = EncOutputs(jnp.asarray(d[f"{v}_out_enc_pred_logits"]), jnp.asarray(d[f"{v}_out_enc_pred_boxes"]))
    points = {**_stored_points(d, v, "fg", fi, n_layers), **_stored_points(d, v, "gt", gi, n_layers)}
    prompts = _prompts(path, d)
    prompts_in = jnp.zeros((1, 8, 768)) if prompts is None else jnp.asarray(prompts)
    out = hipie_criterion(fg, fi, dn, gi, enc, ei, tg, prompts_in, points=points)
    return out, prompts is not None


def _rel(got: float, want: float) -> float:
    if want == 0.0:
        return abs(got)
    return abs(got - want) / abs(want)


# ------------------------------------------------------------------------------------------ golden tests

@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_targets(golden_file, variant) -> None:
    """SegLLM GT construction (architecture.md §T1) reproduces the stored boxes / positive maps / labels count."""
    d = _load(golden_file)
    tg = _targets(d)
    for b in range(tg.boxes.shape[0]):
        n = int(tg.valid[b].sum())
        assert n == len(d[f"tgt{b}_labels"])
        np.testing.assert_array_equal(np.asarray(tg.boxes[b, :n]), d[f"tgt{b}_boxes"])
        np.testing.assert_array_equal(np.asarray(tg.positive_map[b, :n]), d[f"tgt{b}_positive_map"])


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_matcher_indices_exact(golden_file, variant) -> None:
    """simOTA (fg, every layer) and Hungarian (encoder proposals) indices equal the stored ones."""
    d, v = _load(golden_file), variant
    tg = _targets(d)
    n_layers, batch = _num_layers(d, v), tg.boxes.shape[0]
    for layer in range(n_layers):
        ind = simota_match(d[f"{v}_out_fg_l{layer}_pred_logits"], d[f"{v}_out_fg_l{layer}_pred_boxes"],
                           tg.boxes, tg.positive_map, tg.valid)
        for b in range(batch):
            np.testing.assert_array_equal(ind[b][0], d[f"{v}_idx_fg_l{layer}_b{b}_src"],
                                          err_msg=f"fg l{layer} b{b} src")
            np.testing.assert_array_equal(ind[b][1], d[f"{v}_idx_fg_l{layer}_b{b}_tgt"],
                                          err_msg=f"fg l{layer} b{b} tgt")
    ind = encoder_match(d[f"{v}_out_enc_pred_logits"], d[f"{v}_out_enc_pred_boxes"], tg.boxes, tg.valid)
    dn = dn_match_indices(tg.counts, single_padding=int(d[f"{v}_dn_meta"][0]), num_groups=int(d[f"{v}_dn_meta"][1]))
    for b in range(batch):
        np.testing.assert_array_equal(ind[b][0], d[f"{v}_idx_enc_b{b}_src"])
        np.testing.assert_array_equal(ind[b][1], d[f"{v}_idx_enc_b{b}_tgt"])
        np.testing.assert_array_equal(dn[b][0], d[f"{v}_idx_gt_l0_b{b}_src"])
        np.testing.assert_array_equal(dn[b][1], d[f"{v}_idx_gt_l0_b{b}_tgt"])


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_criterion_terms(golden_file, variant) -> None:
    """Every merged / per-group / weighted term and the total within rel 1e-5; prints the error table."""
    d, v = _load(golden_file), variant
    out, have_prompts = _run_golden(golden_file, v)
    keys, want = [str(k) for k in d[f"{v}_loss_keys"]], d[f"{v}_loss_raw"]
    assert set(out.raw) == set(keys), f"key sets differ: {set(out.raw) ^ set(keys)}"
    print(f"\n{golden_file.stem} [{v}]  {'term':<16s} {'golden':>14s} {'port':>14s} {'rel':>9s}")
    failures = []
    for k, w in zip(keys, want, strict=True):
        got = float(out.raw[k])
        rel = _rel(got, float(w))
        if w != 0.0 or got != 0.0:
            print(f"{'':>{len(golden_file.stem) + len(v) + 4}s}{k:<16s} {w:14.6f} {got:14.6f} {rel:9.2e}")
        if rel > REL_TOL:
            failures.append((k, w, got, rel))
    for g in ("fg", "gt"):
        worst = 0.0
        for k, w in zip(d[f"{v}_crit_{g}_keys"], d[f"{v}_crit_{g}_values"], strict=True):
            rel = _rel(float(out.per_group[g][str(k)]), float(w))
            worst = max(worst, rel)
            if rel > REL_TOL:
                failures.append((f"{g}:{k}", w, float(out.per_group[g][str(k)]), rel))
        print(f"  per-call '{g}' dict ({len(d[f'{v}_crit_{g}_keys'])} keys): worst rel {worst:.2e}")
    wk, wv = [str(k) for k in d[f"{v}_loss_weighted_keys"]], d[f"{v}_loss_weighted"]
    for k, w in zip(wk, wv, strict=True):
        if k in out.weighted and _rel(float(out.weighted[k]), float(w)) > REL_TOL:
            failures.append((f"weighted:{k}", w, float(out.weighted[k]), _rel(float(out.weighted[k]), float(w))))
    l2 = float(out.prompt_l2) if have_prompts else float(d[f"{v}_loss_prompt_l2"])
    total = float(sum(float(x) for x in out.weighted.values())) + l2
    want_total = float(d[f"{v}_loss_total"])
    print(f"  prompt_l2 rel {_rel(l2, float(d[f'{v}_loss_prompt_l2'])):.2e}   total rel "
          f"{_rel(total, want_total):.2e}  (port {total:.4f}, golden {want_total:.4f})")
    assert _rel(l2, float(d[f"{v}_loss_prompt_l2"])) <= REL_TOL
    assert _rel(total, float(d[f"{v}_loss_total"])) <= REL_TOL
    assert not failures, failures


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_importance_sampling(golden_file, variant) -> None:
    """Stored U1 (+ U2 = last columns) of fg call 0 -> the stored points (as sets; torch.topk orders ties
    differently) and the same final-layer fg mask losses."""
    d, v = _load(golden_file), variant
    n_layers = _num_layers(d, v)
    final = n_layers - 1
    stored = d[f"{v}_points_fg_call0"]                        # [N_m, 12544, 2]
    u1 = d[f"{v}_points_fg_call0_oversampled_U1"]            # [N_m, 37632, 2]
    n_unc = int(0.75 * stored.shape[1])
    masks = np.concatenate([d[f"{v}_out_fg_l{final}_b{b}_pred_masks"]
                            for b in range(sum(1 for k in d if k.startswith(f"{v}_out_fg_l{final}_b")))])
    got = np.asarray(importance_points(jnp.asarray(masks), jnp.asarray(u1), jnp.asarray(stored[:, n_unc:]), n_unc))
    assert got.shape == stored.shape
    for i in range(len(got)):
        a = got[i, :n_unc][np.lexsort(got[i, :n_unc].T)]
        b = stored[i, :n_unc][np.lexsort(stored[i, :n_unc].T)]
        np.testing.assert_array_equal(a, b, err_msg=f"mask {i}: importance-selected point set differs")
    np.testing.assert_array_equal(got[:, n_unc:], stored[:, n_unc:])
    # same losses from the replayed points (order of points is irrelevant to the sums)
    tg = _targets(d)
    idx = pad_indices([(d[f"{v}_idx_fg_l{final}_b{b}_src"], d[f"{v}_idx_fg_l{final}_b{b}_tgt"])
                       for b in range(tg.boxes.shape[0])])
    counts = np.asarray(idx.valid).sum(1)
    k = idx.src.shape[-1]
    res = mask_losses(jnp.asarray(pad_rows(masks, counts, k)), idx.tgt, idx.valid,
                      downsample_gt_masks(tg.masks), jnp.asarray(pad_rows(got, counts, k)))
    crit = dict(zip([str(x) for x in d[f"{v}_crit_fg_keys"]], d[f"{v}_crit_fg_values"], strict=True))
    for name in ("loss_mask", "loss_dice"):
        assert _rel(float(res[name]), float(crit[name])) <= REL_TOL, name


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_dn_queries(golden_file, variant) -> None:
    """DN attention mask (shape, blocking) and DN label / box inputs (det: no noise; rand: stored draws)."""
    d, v = _load(golden_file), variant
    tg = _targets(d)
    label_enc = jnp.asarray(d["dn_label_enc"])
    want_mask = d[f"{v}_dn_attn_mask"]
    num_queries = want_mask.shape[0] - int(d[f"{v}_dn_meta"][0]) * int(d[f"{v}_dn_meta"][1])
    if f"{v}_dn_rand_sign01" in d:
        counts = tg.counts
        draws = (flat_draws_to_padded(d[f"{v}_dn_rand_sign01"], counts),
                 flat_draws_to_padded(d[f"{v}_dn_rand_part"], counts))
        q = prepare_dn_queries(tg.boxes, tg.valid, label_enc, num_queries=num_queries, draws=draws)
    else:
        q = prepare_dn_queries(tg.boxes, tg.valid, label_enc, num_queries=num_queries, box_noise_scale=0.0)
    assert (q.single_padding, q.num_groups) == tuple(int(x) for x in d[f"{v}_dn_meta"][:2])
    assert q.attn_mask.shape == want_mask.shape
    np.testing.assert_array_equal(np.asarray(q.attn_mask), want_mask)
    np.testing.assert_allclose(np.asarray(q.label), d[f"{v}_dn_input_query_label"], rtol=0, atol=0)
    err = np.abs(np.asarray(q.bbox_logit) - d[f"{v}_dn_input_query_bbox"]).max()
    print(f"\n{golden_file.stem} [{v}] DN box-logit max|d| = {err:.2e}")
    np.testing.assert_allclose(np.asarray(q.bbox_logit), d[f"{v}_dn_input_query_bbox"], rtol=1e-5, atol=1e-6)


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN[:1])
def test_golden_weight_dict(golden_file, variant) -> None:
    d = _load(golden_file)
    want = dict(zip([str(k) for k in d["weight_dict_keys"]], d["weight_dict_values"].tolist(), strict=True))
    assert weight_dict() == want


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN)
def test_golden_iou_train_metric(golden_file, variant) -> None:
    d, v = _load(golden_file), variant
    final = _num_layers(d, v) - 1
    last = np.stack([d[f"{v}_out_fg_l{final}_b{b}_pred_masks"][-1] for b in range(d["gt_target_masks"].shape[0])])
    got = float(iou_train_metric(jnp.asarray(last), jnp.asarray(d["gt_target_masks"])))
    assert _rel(got, float(d[f"{v}_iou_train"])) <= 1e-4, (got, float(d[f"{v}_iou_train"]))


@pytest.mark.golden
@pytest.mark.parametrize("golden_file,variant", GOLDEN[:1])
def test_golden_fresh_draws_run(golden_file, variant) -> None:
    """With a PRNG key instead of stored points: non-mask terms unchanged, mask terms finite; a bg group
    (weight 0, empty targets) changes nothing."""
    d, v = _load(golden_file), variant
    ref, _ = _run_golden(golden_file, v)
    tg = _targets(d)
    n_layers, batch = _num_layers(d, v), tg.boxes.shape[0]
    fi = _stored_indices(d, v, "fg", n_layers, batch)
    gi = _stored_indices(d, v, "gt", n_layers, batch)
    ei = pad_indices([(d[f"{v}_idx_enc_b{b}_src"], d[f"{v}_idx_enc_b{b}_tgt"]) for b in range(batch)])
    enc = EncOutputs(jnp.asarray(d[f"{v}_out_enc_pred_logits"]), jnp.asarray(d[f"{v}_out_enc_pred_boxes"]))
    fg = _group(d, v, "fg", fi, n_layers, batch)
    bg = GroupOutputs(jnp.ones((n_layers, batch, 10, fg.logits.shape[-1])), jnp.full((n_layers, batch, 10, 4), 0.5))
    out = hipie_criterion(fg, fi, _group(d, v, "gt", gi, n_layers, batch), gi, enc, ei, tg, jnp.zeros((1, 8, 768)),
                          bg=bg, key=jax.random.key(0))
    assert set(out.per_group["bg"]) <= set(out.raw) and all(float(x) == 0.0 for x in out.per_group["bg"].values())
    for k, val in out.raw.items():
        assert np.isfinite(float(val)), k
        if "mask" not in k and "dice" not in k:
            assert float(val) == float(ref.raw[k]), k


# ---------------------------------------------------------------------------- float64 NumPy references

def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_focal(x, y, alpha=0.25, gamma=2.0):
    p = _np_sigmoid(x)
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    return (alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma


def _np_giou_fvcore(a, b, eps=1e-7):
    xk1, yk1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    xk2, yk2 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.where((xk2 > xk1) & (yk2 > yk1), (xk2 - xk1) * (yk2 - yk1), 0.0)
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    c = ((np.maximum(a[:, 2], b[:, 2]) - np.minimum(a[:, 0], b[:, 0]))
         * (np.maximum(a[:, 3], b[:, 3]) - np.minimum(a[:, 1], b[:, 1])))
    return inter / (union + eps) - (c - union) / (c + eps)


def _np_cxcywh_to_xyxy(b):
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)


RNG = np.random.default_rng(1234)
X_PTS = (RNG.normal(0, 3, (3, 50))).astype(np.float32)
Y_PTS = np.clip(RNG.random((3, 50)) * 1.4 - 0.2, 0, 1).astype(np.float32)  # fractional + exact 0/1 labels
# pairs: overlapping, disjoint, identical, nested
SRC_CXCYWH = np.array([[0.5, 0.5, 0.4, 0.3], [0.2, 0.2, 0.1, 0.1], [0.6, 0.4, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]],
                      np.float32)
TGT_CXCYWH = np.array([[0.55, 0.45, 0.3, 0.4], [0.8, 0.7, 0.2, 0.1], [0.6, 0.4, 0.2, 0.2], [0.5, 0.5, 0.2, 0.3]],
                      np.float32)


def test_token_focal_loss_vs_numpy() -> None:
    x = RNG.normal(0, 2, (2, 5, 8)).astype(np.float32)
    y = (RNG.random((2, 5, 8)) > 0.7).astype(np.float32)
    got = float(L.token_focal_loss(jnp.asarray(x), jnp.asarray(y), 3))
    want = _np_focal(x.astype(np.float64), y.astype(np.float64)).sum() / 3
    assert _rel(got, want) <= 1e-6


def test_label_loss_builds_targets_from_indices() -> None:
    from segllm_jax.train.criterion import label_loss
    x = RNG.normal(0, 2, (2, 6, 8)).astype(np.float32)
    pm = np.zeros((2, 2, 8), np.float32)
    pm[0, 0, :4] = pm[0, 1, 4:] = pm[1, 0, 4:] = 1
    src = np.array([[4, 1], [2, 0]])
    tgt = np.array([[1, 0], [0, 0]])
    valid = np.array([[True, True], [True, False]])
    y = np.zeros_like(x)
    y[0, 4], y[0, 1], y[1, 2] = pm[0, 1], pm[0, 0], pm[1, 0]
    got = float(label_loss(jnp.asarray(x), jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(valid), jnp.asarray(pm)))
    assert _rel(got, _np_focal(x.astype(np.float64), y).sum() / 3) <= 1e-6


def test_l1_box_loss_vs_numpy() -> None:
    valid = np.array([True, True, True, False])
    got = float(L.l1_box_loss(jnp.asarray(SRC_CXCYWH), jnp.asarray(TGT_CXCYWH), jnp.asarray(valid), 3))
    a = np.float64(3) / (3 + 1e-6)
    want = np.abs(SRC_CXCYWH[:3].astype(np.float64) - TGT_CXCYWH[:3]).sum() * a / 3
    assert _rel(got, want) <= 1e-6


def test_giou_loss_vs_numpy_including_disjoint_boxes() -> None:
    s = _np_cxcywh_to_xyxy(SRC_CXCYWH.astype(np.float64))
    t = _np_cxcywh_to_xyxy(TGT_CXCYWH.astype(np.float64))
    g = _np_giou_fvcore(s, t)
    assert g[1] < 0 and abs(g[2] - 1) < 1e-5          # disjoint -> negative GIoU; identical -> 1 (up to eps)
    valid = np.ones(4, bool)
    got = float(L.giou_box_loss(box_cxcywh_to_xyxy(jnp.asarray(SRC_CXCYWH)),
                                box_cxcywh_to_xyxy(jnp.asarray(TGT_CXCYWH)), jnp.asarray(valid), 4))
    want = (1 - g).sum() * (4 / (4 + 1e-6)) / 4
    assert _rel(got, want) <= 1e-6
    from segllm_jax.train.box_ops import elementwise_generalized_iou, pairwise_generalized_iou
    s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(np.asarray(elementwise_generalized_iou(s32, t32)), g, rtol=1e-5, atol=1e-6)
    pair = np.asarray(pairwise_generalized_iou(s32, t32))
    np.testing.assert_allclose(np.diag(pair), g, rtol=1e-5, atol=1e-6)


def test_boxiou_loss_vs_numpy() -> None:
    s = _np_cxcywh_to_xyxy(SRC_CXCYWH.astype(np.float64))
    t = _np_cxcywh_to_xyxy(TGT_CXCYWH.astype(np.float64))
    inter = np.clip(np.minimum(s[:, 2:], t[:, 2:]) - np.maximum(s[:, :2], t[:, :2]), 0, None).prod(-1)
    iou = inter / ((s[:, 2:] - s[:, :2]).prod(-1) + (t[:, 2:] - t[:, :2]).prod(-1) - inter)
    x = np.array([0.3, -1.0, 2.0, 0.0])
    bce = -(iou * np.log(_np_sigmoid(x)) + (1 - iou) * np.log(1 - _np_sigmoid(x)))
    got = float(L.boxiou_loss(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                              jnp.ones(4, bool), 4))
    assert _rel(got, bce.mean() * 4 / (4 + 1e-6)) <= 1e-6


def test_mask_focal_dice_bce_vs_numpy() -> None:
    valid = np.array([True, True, False])
    x, y = X_PTS.astype(np.float64), Y_PTS.astype(np.float64)
    args = (jnp.asarray(X_PTS), jnp.asarray(Y_PTS), jnp.asarray(valid), 2)
    focal = _np_focal(x, y).mean(-1)[:2].sum() / 2
    p = _np_sigmoid(x)
    dice = (1 - (2 * (p * y).sum(-1) + 1) / (p.sum(-1) + y.sum(-1) + 1))[:2].sum() / 2
    bce = (-(y * np.log(p) + (1 - y) * np.log(1 - p))).mean(-1)[:2].sum() / 2
    assert _rel(float(L.mask_focal_loss(*args)), focal) <= 1e-6
    assert _rel(float(L.dice_loss(*args)), dice) <= 1e-6
    assert _rel(float(L.mask_bce_loss(*args)), bce) <= 1e-6


def test_empty_target_set_gives_exact_zeros() -> None:
    none = jnp.zeros(3, bool)
    assert float(L.mask_focal_loss(jnp.asarray(X_PTS), jnp.asarray(Y_PTS), none, 0)) == 0.0
    assert float(L.dice_loss(jnp.asarray(X_PTS), jnp.asarray(Y_PTS), none, 0)) == 0.0
    assert float(L.token_focal_loss(jnp.asarray(X_PTS)[None], jnp.zeros((1, 3, 50)), 0)) == 0.0
    nb = jnp.zeros(4, bool)
    assert float(L.l1_box_loss(jnp.asarray(SRC_CXCYWH), jnp.asarray(TGT_CXCYWH), nb, 0)) == 0.0
    assert float(L.giou_box_loss(jnp.asarray(SRC_CXCYWH), jnp.zeros((4, 4)), nb, 0)) == 0.0
    # matcher / padding with no GT
    assert dynamic_k_matching(np.zeros((5, 0), np.float32), np.zeros((5, 0), np.float32))[0].size == 0
    p = pad_indices([(np.zeros(0, int), np.zeros(0, int))] * 2)
    assert p.src.shape == (2, 1) and not bool(p.valid.any())


def test_prompt_l2() -> None:
    x = RNG.normal(0, 1, (2, 8, 16)).astype(np.float32)
    assert _rel(float(L.prompt_l2_loss(jnp.asarray(x))), 1e-3 * (x.astype(np.float64) ** 2).mean()) <= 1e-6


def _np_grid_sample(img, pts):
    h, w = img.shape
    out = np.zeros(len(pts))
    for n, (u, v) in enumerate(pts):
        x, y = u * w - 0.5, v * h - 0.5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
            for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                if 0 <= xi < w and 0 <= yi < h:
                    out[n] += img[yi, xi] * wx * wy
    return out


def test_point_sample_vs_numpy_grid_sample() -> None:
    img = RNG.normal(0, 1, (2, 5, 7)).astype(np.float32)
    pts = RNG.random((2, 40, 2)).astype(np.float32)
    pts[:, :4] = [[0.0, 0.0], [1.0, 1.0], [0.99, 0.01], [0.5, 0.5]]   # edges: zero padding half-weights
    got = np.asarray(point_sample(jnp.asarray(img), jnp.asarray(pts)))
    want = np.stack([_np_grid_sample(img[i].astype(np.float64), pts[i].astype(np.float64)) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_downsample_gt_masks_offsets() -> None:
    m = np.zeros((1, 40, 30), np.float32)
    m[0, 2, 6] = m[0, 38, 26] = 1
    ds = np.asarray(downsample_gt_masks(jnp.asarray(m)))
    assert ds.shape == (1, 16, 8)             # padded to 64 x 32, stride 4
    assert ds[0, 0, 1] == 1 and ds[0, 9, 6] == 1 and ds.sum() == 2


def test_dynamic_k_matching_conflicts_and_dynamic_k() -> None:
    cost = np.array([[1, 2], [5, 3], [6, 7], [4, 9], [8, 8]], np.float32)
    iou = np.zeros((5, 2), np.float32)
    src, tgt = dynamic_k_matching(cost, iou)               # both GT want q0; GT1 falls back to q1
    assert src.tolist() == [0, 1] and tgt.tolist() == [0, 1]
    iou[:3, 0] = [0.9, 0.9, 0.7]                            # Σ top-10 = 2.5 -> k_0 = 2
    src, tgt = dynamic_k_matching(cost, iou)
    assert src.tolist() == [0, 1, 3] and tgt.tolist() == [0, 1, 0]


def test_dn_attention_mask_two_groups() -> None:
    m = np.asarray(dn_attention_mask(max_gt=1, num_groups=2, num_queries=3))   # pad = 4
    assert m.shape == (7, 7)
    assert m[4:, :4].all() and not m[4:, 4:].any()                               # matching -> DN blocked
    assert not m[:2, :2].any() and m[:2, 2:4].all() and m[2:4, :2].all()         # groups isolated
    assert not m[:4, 4:].any()                                                    # DN sees matching queries
    idx = dn_match_indices([2, 1], single_padding=4, num_groups=2)
    assert idx[0][0].tolist() == [0, 1, 4, 5] and idx[0][1].tolist() == [0, 1, 0, 1]


def test_dn_noise_bounds_from_key() -> None:
    boxes = jnp.asarray([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]], jnp.float32)
    q = prepare_dn_queries(boxes, jnp.asarray([[True, False]]), jnp.ones((1, 4)), num_queries=3,
                           key=jax.random.key(0))
    assert q.label.shape == (1, 4, 4) and q.bbox_logit.shape == (1, 4, 4)
    assert float(jnp.abs(q.label[0, 1]).sum()) == 0.0 and float(jnp.abs(q.bbox_logit[0, 3]).sum()) == 0.0
    pos = jax.nn.sigmoid(q.bbox_logit[0, 0])
    xyxy = np.asarray(box_cxcywh_to_xyxy(pos))
    assert np.all(np.abs(xyxy - np.array([0.4, 0.4, 0.6, 0.6])) < 0.1 + 1e-5)  # positives: < half the size
    with pytest.raises(ValueError):
        prepare_dn_queries(boxes, jnp.asarray([[True, False]]), jnp.ones((1, 4)), num_queries=3)


def test_boxes_from_masks_device_and_host_agree() -> None:
    from segllm_jax.train.box_ops import boxes_from_masks
    from segllm_jax.train.criterion import _np_boxes_from_masks
    m = np.zeros((3, 6, 9), np.uint8)
    m[0, 1:4, 2:7] = 1
    m[1, 5, 8] = 1                     # a single corner pixel -> (8, 5, 9, 6)
    want = np.array([[2, 1, 7, 4], [8, 5, 9, 6], [0, 0, 0, 0]], np.float32)   # empty mask -> zeros
    np.testing.assert_array_equal(_np_boxes_from_masks(m), want)
    np.testing.assert_array_equal(np.asarray(boxes_from_masks(jnp.asarray(m))), want)
