"""Host post-processing (architecture.md §H14): class scores, batched NMS, top-k, SegLLM's target choice.

Golden: the stored ``pred_logits`` / ``pred_boxes`` / ``pred_iou`` of every golden file (both
sizes) must reproduce ``post_*`` and ``sel_*`` exactly (indices) or to float32 rounding (scores).
Hand-made cases pin the semantics the golden files may not exercise.
"""

from __future__ import annotations

import numpy as np
import pytest

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.postprocess import (
    batched_nms,
    box_cxcywh_to_xyxy,
    class_logits,
    nms,
    select_target,
    topk_desc,
)

from .conftest import _golden_params, compare

GOLDEN_ALL = _golden_params("seed*_*.npz")
CFG = HipieConfig.hipie_r50_segllm()


@pytest.mark.golden
@pytest.mark.parametrize("golden_file", GOLDEN_ALL)
def test_postprocess_golden(golden_file) -> None:
    data = np.load(golden_file)
    if "post_keep" not in data:
        pytest.skip(f"{golden_file.name} is not an inference golden file")
    size = int(data["image_size"])
    print(f"\n[{golden_file.name}] post-processing from the golden head outputs")
    compare("class_scores_fg", np.stack([class_logits(x[CFG.num_bg_queries:]) for x in data["pred_logits"]]),
            data["class_scores_fg"])
    for b in range(data["pred_logits"].shape[0]):
        sel = select_target(data["pred_logits"][b], data["pred_boxes"][b], data["pred_iou"][b], CFG, size)
        n_keep, n_top = int(data["post_keep_count"][b]), int(data["post_topk_count"][b])
        np.testing.assert_array_equal(sel.keep, data["post_keep"][b, :n_keep])
        assert (data["post_keep"][b, n_keep:] == -1).all()
        np.testing.assert_array_equal(sel.topk_query, data["post_topk_query"][b, :n_top])
        np.testing.assert_array_equal(sel.topk_label, data["post_topk_label"][b, :n_top])
        compare(f"post_topk_score[{b}]", sel.topk_score, data["post_topk_score"][b, :n_top])
        assert sel.fg_query + CFG.num_bg_queries == data["sel_query"][b]
        assert sel.fg_query == data["sel_fg_query"][b]
        assert sel.label == data["sel_label"][b]
        compare(f"sel_score[{b}]", np.float32(sel.score), data["sel_score"][b])
        compare(f"sel_box_xyxy[{b}]", sel.box_xyxy, data["sel_box_xyxy"][b])


def _logits_for(probs_cls: np.ndarray) -> np.ndarray:
    """Token logits [N, 8] whose class means are logit(p) for the given class probabilities [N, 2]."""
    lg = np.log(probs_cls / (1 - probs_cls)).astype(np.float32)
    return np.repeat(lg, 4, axis=1)


def _with_bg(x: np.ndarray, n_bg: int = CFG.num_bg_queries) -> np.ndarray:
    pad = np.zeros((n_bg,) + x.shape[1:], x.dtype)
    return np.concatenate([pad, x], 0)


def test_class_logits_mean_and_max() -> None:
    t = np.arange(16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_array_equal(class_logits(t), [[1.5, 5.5], [9.5, 13.5]])
    np.testing.assert_array_equal(class_logits(t, max_pool=True), [[3, 7], [11, 15]])


def test_nms_suppresses_above_threshold_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 7.01], [0, 0, 10, 6.99], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    # IoU with box 0: 0.701 (> 0.7, suppressed), 0.699 (kept), 0 (kept)
    np.testing.assert_array_equal(nms(boxes, scores, 0.7), [0, 2, 3])
    # exactly-equal scores keep the lower index first
    np.testing.assert_array_equal(nms(boxes[[0, 3]], np.array([0.5, 0.5], np.float32), 0.7), [0, 1])


def test_batched_nms_is_class_aware() -> None:
    boxes = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1, 0]), 0.7), [0, 1])


def test_selection_prefers_target_class_and_topk_size() -> None:
    n = CFG.num_queries
    probs = np.full((n, 2), 0.01, np.float32)
    boxes = np.zeros((n, 4), np.float32)
    boxes[:, 0] = (np.arange(n) % 10) / 10 + 0.05  # disjoint boxes: nothing is suppressed
    boxes[:, 1] = (np.arange(n) // 10) / 10 + 0.05
    boxes[:, 2:] = 0.08
    probs[3] = [0.99, 0.2]  # best overall, but "reference" class
    probs[7] = [0.1, 0.9]  # best target
    iou = np.full((n, 1), 20.0, np.float32)  # sigmoid ~ 1
    sel = select_target(_with_bg(_logits_for(probs)), _with_bg(boxes), _with_bg(iou), CFG, 1024)
    assert len(sel.keep) == n
    assert len(sel.topk_query) == CFG.test_topk  # min(100, 2 * kept)
    assert sel.topk_query[0] == 3 and sel.topk_label[0] == 0
    assert sel.fg_query == 7 and sel.label == 1
    np.testing.assert_allclose(sel.score, np.sqrt(0.9 * (1 / (1 + np.exp(-20.0)))), rtol=1e-6)


def test_selection_falls_back_to_reference_when_no_target_in_topk() -> None:
    # with top-k = 1 the only entry is a "reference" one: SegLLM's masked argmax still returns it
    probs = np.array([[0.9, 0.3], [0.8, 0.2]], np.float32)
    cfg = HipieConfig.hipie_r50_segllm(num_queries=2, test_topk=1)
    boxes = np.array([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]], np.float32)
    iou = np.zeros((2, 1), np.float32)
    sel = select_target(_with_bg(_logits_for(probs)), _with_bg(boxes), _with_bg(iou), cfg, 100)
    assert (sel.fg_query, sel.label) == (0, 0)


def test_nms_suppressed_target_is_not_selected() -> None:
    # query 0: high reference score; query 1: same box, best *target* score but lower max -> suppressed
    probs = np.array([[0.95, 0.1], [0.2, 0.9], [0.1, 0.5]], np.float32)
    cfg = HipieConfig.hipie_r50_segllm(num_queries=3)
    boxes = np.array([[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]], np.float32)
    iou = np.full((3, 1), 20.0, np.float32)
    sel = select_target(_with_bg(_logits_for(probs)), _with_bg(boxes), _with_bg(iou), cfg, 100)
    # different argmax classes -> batched NMS does not suppress across classes: query 1 survives
    assert list(sel.keep) == [0, 1, 2]
    assert sel.fg_query == 1
    probs[1] = [0.94, 0.9]  # now both are class 0 by argmax -> query 1 is suppressed by query 0
    sel = select_target(_with_bg(_logits_for(probs)), _with_bg(boxes), _with_bg(iou), cfg, 100)
    assert list(sel.keep) == [0, 2]
    # the suppressed query's 0.9 target score is gone: the best remaining target entry is query 2
    assert sel.fg_query == 2 and sel.label == 1


def test_box_is_scaled_not_clipped() -> None:
    xyxy = box_cxcywh_to_xyxy(np.array([0.05, 0.5, 0.3, 0.2], np.float32)) * 1024
    np.testing.assert_allclose(xyxy, [-102.4, 409.6, 204.8, 614.4], rtol=1e-6)
    assert xyxy[0] < 0


def test_topk_desc_ties_lower_index_first() -> None:
    np.testing.assert_array_equal(topk_desc(np.array([0.5, 0.7, 0.5, 0.7], np.float32), 4), [1, 3, 0, 2])
