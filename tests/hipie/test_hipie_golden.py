"""HIPIE end to end vs the PyTorch golden files: uint8 image + prompts -> selected mask.

Weights: the golden recipe as a .pth through the real converter. Every stage is compared with the
README tolerances and printed; the post-processing must pick the same query, and the final mask
must agree (IoU >= 0.999, the README's suggestion; pixels may differ only where the logit is ~0).
If the free-running top-k differs from the golden one only by README near-tie swaps, the golden
order is forced through the test hook and the comparison continues from there.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from segllm_jax.models.hipie.model import selected_mask_jit
from segllm_jax.models.hipie.postprocess import select_targets

from .conftest import GOLDEN_256, _golden_params, compare
from .hipie_helpers import (
    all_pred_masks_jit,
    converted_hipie,
    image_stages_jit,
    mask_iou,
    segment_debug_jit,
    topk_mismatch_is_near_tie,
)

GOLDEN_1024 = _golden_params("seed*_1024.npz")


def _run(golden_file, recipe_pth):
    data = np.load(golden_file)
    seed = int(data["seed"])
    model = converted_hipie(str(recipe_pth(seed)))
    image = jnp.asarray(data["input_image_u8"].transpose(1, 2, 0)[None])  # [1, S, S, 3] uint8
    prompts = jnp.asarray(data["prompts"])
    image_index = jnp.zeros(prompts.shape[0], jnp.int32)  # the prompts of a golden file share one image
    feats, levels = image_stages_jit(model, image)
    out = segment_debug_jit(model, levels, prompts, image_index)
    got, want = np.asarray(out.topk_indices), data["topk_indices"]
    forced = False
    if not np.array_equal(got, want):
        err = float(np.abs(np.asarray(out.enc_scores) - data["enc_scores"]).max()) if "enc_scores" in data else 1e-5
        for b in range(want.shape[0]):
            print(f"  topk_indices[{b}] differs at ranks {np.nonzero(got[b] != want[b])[0].tolist()}")
            assert topk_mismatch_is_near_tie(got[b], want[b], np.asarray(out.enc_scores[b]), tol=4 * err + 1e-6), \
                f"prompt {b}: top-k differs beyond near-tie swaps"
        out = segment_debug_jit(model, levels, prompts, image_index, jnp.asarray(want))
        forced = True
    print(f"\n[{golden_file.name}] seed={seed} end to end{' (golden top-k forced: near-tie)' if forced else ''}")
    return data, model, feats, levels, out


def _select_and_mask(data, model, out):
    sels = select_targets(np.asarray(out.pred_logits), np.asarray(out.pred_boxes), np.asarray(out.pred_iou),
                          model.cfg, out.image_size)
    nb = model.cfg.num_bg_queries
    sel_query = np.asarray([s.fg_query + nb for s in sels], np.int32)
    np.testing.assert_array_equal(sel_query, data["sel_query"])
    np.testing.assert_array_equal([s.label for s in sels], data["sel_label"])
    compare("sel_score", np.asarray([s.score for s in sels]), data["sel_score"])
    compare("sel_box_xyxy", np.stack([s.box_xyxy for s in sels]), data["sel_box_xyxy"])
    logits, masks = selected_mask_jit(model, out, jnp.asarray(sel_query))
    b, s = data["final_mask_shape"][0], data["final_mask_shape"][1]
    want_masks = np.unpackbits(data["final_mask_packed"], axis=1).reshape(b, s, s).astype(bool)
    for i in range(b):
        iou = mask_iou(np.asarray(masks[i]), want_masks[i])
        print(f"  final mask[{i}] IoU={iou:.6f} area={int(np.asarray(masks[i]).sum())} "
              f"(golden {int(data['final_mask_area'][i])})")
        assert iou >= 0.999
    return sels, np.asarray(logits)


@pytest.mark.golden
@pytest.mark.parametrize("golden_file", GOLDEN_256)
def test_hipie_end_to_end_golden(golden_file, recipe_pth) -> None:
    data, model, feats, levels, out = _run(golden_file, recipe_pth)
    compare("res5", np.asarray(feats.res5).transpose(0, 3, 1, 2), data["res5"], atol_rel=1e-3)
    compare("src_flatten", levels.src_flatten[0], data["src_flatten"])
    compare("lvl_pos", levels.lvl_pos[0], data["lvl_pos"])
    compare("vl_v", out.encoder.vl_v, data["vl_v"])
    compare("lang_fused", out.lang_fused, data["lang_fused"])
    for i, m in enumerate(out.encoder.memory_layers):
        compare(f"memory[{i}]", m, data["memory"][i])
    compare("enc_scores", out.enc_scores, data["enc_scores"])
    compare("enc_coord_unact", out.enc_coord_unact, data["enc_coord_unact"])
    compare("init_reference", out.init_reference, data["init_reference"])
    for i in range(out.hs.shape[0]):
        compare(f"hs[{i}]", out.hs[i], data["hs"][i])
    compare("inter_references", out.inter_references, data["inter_references"])
    compare("pred_logits", out.pred_logits, data["pred_logits"])
    compare("pred_boxes", out.pred_boxes, data["pred_boxes"])
    compare("pred_iou", out.pred_iou, data["pred_iou"])
    compare("controller_params", out.controller_params, data["controller_params"])
    compare("mask_feats", np.asarray(out.mask_feats).transpose(0, 3, 1, 2), data["mask_feats"])
    pred_masks = np.asarray(all_pred_masks_jit(model, out))
    compare("pred_masks", pred_masks, data["pred_masks"])
    _, logits = _select_and_mask(data, model, out)
    compare("sel_pred_mask", logits, data["pred_masks"][np.arange(logits.shape[0]), data["sel_query"]])


@pytest.mark.golden
@pytest.mark.parametrize("golden_file", GOLDEN_1024)
def test_hipie_end_to_end_golden_1024(golden_file, recipe_pth) -> None:
    data, model, feats, levels, out = _run(golden_file, recipe_pth)
    rows = data["row_indices"]
    compare("res5_mean_c", np.asarray(feats.res5).mean(axis=(0, 1, 2)), data["res5_mean_c"], atol_rel=1e-3)
    compare("src_flatten_rows", np.asarray(levels.src_flatten[0])[rows], data["src_flatten_rows"])
    compare("lvl_pos_rows", np.asarray(levels.lvl_pos[0])[rows], data["lvl_pos_rows"])
    compare("vl_v_rows", np.asarray(out.encoder.vl_v)[:, rows], data["vl_v_rows"])
    compare("lang_fused", out.lang_fused, data["lang_fused"])
    for i, m in enumerate(out.encoder.memory_layers):
        compare(f"memory_rows[{i}]", np.asarray(m)[:, rows], data["memory_rows"][i])
    compare("topk_scores", out.topk_scores, data["topk_scores"])
    compare("init_reference", out.init_reference, data["init_reference"])
    compare("inter_references", out.inter_references, data["inter_references"])
    compare("hs_last", out.hs[-1], data["hs_last"])
    compare("pred_logits", out.pred_logits, data["pred_logits"])
    compare("pred_boxes", out.pred_boxes, data["pred_boxes"])
    compare("pred_iou", out.pred_iou, data["pred_iou"])
    compare("class_scores_fg", np.asarray(out.pred_logits)[:, model.cfg.num_bg_queries:].reshape(
        out.pred_logits.shape[0], -1, 2, 4).mean(-1), data["class_scores_fg"])
    compare("mask_feats", np.asarray(out.mask_feats).transpose(0, 3, 1, 2), data["mask_feats"])
    _, logits = _select_and_mask(data, model, out)
    compare("sel_pred_mask", logits, data["sel_pred_mask"])
