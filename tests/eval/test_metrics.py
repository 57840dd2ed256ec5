"""SegLLM per-round metrics against hand-computed cases (4x4 masks, pixel counts in comments)."""

from __future__ import annotations

import numpy as np
import pytest

from segllm_jax.errors import InputError
from segllm_jax.eval.metrics import FIELDS, MASK_IOU_EPS, RoundMetrics, box_iou, mask_box


def _mask(*cells: tuple[int, int], size: int = 4) -> np.ndarray:
    m = np.zeros((size, size), bool)
    for r, c in cells:
        m[r, c] = True
    return m


GT = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # 2x2 block top-left: 4 px, box [0, 0, 2, 2]
SAME = GT.copy()
DISJOINT = _mask((2, 2), (2, 3), (3, 2), (3, 3))  # I=0, U=8, box [2, 2, 4, 4]
SHIFTED = _mask((0, 1), (0, 2), (1, 1), (1, 2))  # I=2, U=6, box [1, 0, 3, 2] → box IoU 2/6
WIDER = _mask((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2))  # I=4, U=6, box [0, 0, 3, 2] → 4/6
EMPTY = np.zeros((4, 4), bool)


def _single(pred, gt, box=None) -> dict[str, float]:
    metrics = RoundMetrics()
    metrics.update(0, pred, gt, box)
    return metrics.summary()


def test_mask_box_and_box_iou():
    np.testing.assert_array_equal(mask_box(GT), [0, 0, 2, 2])
    np.testing.assert_array_equal(mask_box(_mask((3, 1))), [1, 3, 2, 4])  # exclusive ends
    assert mask_box(EMPTY) is None
    assert box_iou(np.array([1, 0, 3, 2.0]), np.array([0, 0, 2, 2.0])) == pytest.approx(2 / 6)
    assert box_iou(None, np.array([0, 0, 2, 2.0])) == 0.0
    assert box_iou(np.zeros(4), np.zeros(4)) == 0.0  # degenerate boxes, no division by zero


@pytest.mark.parametrize(
    "pred, giou, ciou, hit",
    [
        (SAME, 4 / (4 + MASK_IOU_EPS), 1.0, 1.0),  # identical: eps keeps gIoU just below 1
        (DISJOINT, 0.0, 0.0, 0.0),
        (SHIFTED, 2 / (6 + MASK_IOU_EPS), 2 / 6, 0.0),  # box IoU 1/3: miss
        (WIDER, 4 / (6 + MASK_IOU_EPS), 4 / 6, 1.0),  # box IoU 2/3: hit
        (EMPTY, 0.0, 0.0, 0.0),  # empty prediction, no box given: miss
    ],
)
def test_single_mask_cases(pred, giou, ciou, hit):
    s = _single(pred, GT)
    assert s["mIoU_round0"] == pytest.approx(giou, abs=1e-12)
    assert s["oIoU_round0"] == pytest.approx(ciou, abs=1e-12)
    assert s["P@0.5_round0"] == hit
    assert s["n_round0"] == 1


def test_empty_prediction_with_explicit_box_still_scores_the_box():
    s = _single(EMPTY, GT, box=[0.0, 0.0, 2.0, 2.0])
    assert (s["mIoU_round0"], s["oIoU_round0"], s["P@0.5_round0"]) == (0.0, 0.0, 1.0)


def test_explicit_box_overrides_mask_extent():
    s = _single(SAME, GT, box=[2.0, 2.0, 4.0, 4.0])  # perfect mask, wrong box
    assert s["P@0.5_round0"] == 0.0 and s["oIoU_round0"] == 1.0


def test_empty_ground_truth():
    metrics = RoundMetrics()
    metrics.update(0, WIDER, EMPTY)  # I=0, U=6
    metrics.update(0, SAME, GT)  # I=4, U=4
    s = metrics.summary()
    assert s["mIoU_round0"] == pytest.approx((0 + 4 / (4 + MASK_IOU_EPS)) / 2)
    assert s["oIoU_round0"] == pytest.approx(4 / 10)  # the false positive's pixels enlarge ΣU
    assert s["P@0.5_round0"] == 0.5  # no GT box: miss


def test_both_empty_scores_zero_like_the_original():
    metrics = RoundMetrics()
    metrics.update(0, EMPTY, EMPTY)
    assert metrics.summary() == {"mIoU_round0": 0.0, "oIoU_round0": 0.0, "P@0.5_round0": 0.0, "n_round0": 1.0}
    metrics.update(0, SAME, GT)  # ΣI/ΣU unaffected by the empty pair, gIoU halved
    s = metrics.summary()
    assert s["oIoU_round0"] == 1.0
    assert s["mIoU_round0"] == pytest.approx(4 / (4 + MASK_IOU_EPS) / 2)


def _several_rounds() -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Three conversations of 2, 3 and 1 rounds as (preds, gts)."""
    return [
        ([SAME, SHIFTED], [GT, GT]),
        ([DISJOINT, WIDER, EMPTY], [GT, GT, GT]),
        ([SAME], [GT]),
    ]


def test_several_rounds():
    metrics = RoundMetrics()
    for preds, gts in _several_rounds():
        metrics.add_conversation(preds, gts)
    s = metrics.summary()
    assert metrics.num_rounds == 3
    # round 0: SAME, DISJOINT, SAME → I = 4+0+4, U = 4+8+4
    assert s["n_round0"] == 3
    assert s["mIoU_round0"] == pytest.approx(2 * 4 / (4 + MASK_IOU_EPS) / 3)
    assert s["oIoU_round0"] == pytest.approx(8 / 16)
    assert s["P@0.5_round0"] == pytest.approx(2 / 3)
    # round 1: SHIFTED, WIDER → I = 2+4, U = 6+6
    assert s["mIoU_round1"] == pytest.approx((2 / (6 + MASK_IOU_EPS) + 4 / (6 + MASK_IOU_EPS)) / 2)
    assert s["oIoU_round1"] == pytest.approx(6 / 12)
    assert s["P@0.5_round1"] == 0.5
    # round 2: EMPTY vs GT → I = 0, U = 4
    assert (s["mIoU_round2"], s["oIoU_round2"], s["P@0.5_round2"], s["n_round2"]) == (0.0, 0.0, 0.0, 1.0)
    table = metrics.markdown().splitlines()
    assert table[0].startswith("| round | n |") and len(table) == 2 + 3
    assert table[2] == "| 1 | 3 | 66.67 | 50.00 | 66.67 |"  # gIoU 8/(3*4.0001) = 0.6666500...


def test_merge_and_arrays_equal_single_pass():
    full, a, b = RoundMetrics(), RoundMetrics(), RoundMetrics()
    convs = _several_rounds()
    for preds, gts in convs:
        full.add_conversation(preds, gts)
    a.add_conversation(*convs[2])  # one round only: shapes differ across shards
    for preds, gts in convs[:2]:
        b.add_conversation(preds, gts)
    assert a.merge(b).summary() == pytest.approx(full.summary())
    # all-reduce path: same-shape arrays, summed, read back
    reduced = a.to_array(12) + b.to_array(12)
    assert reduced.shape == (12, len(FIELDS))
    merged = RoundMetrics.from_array(reduced)
    assert merged.summary() == pytest.approx(full.summary())
    assert len(merged.markdown().splitlines()) == 2 + 3  # padded empty rounds are not reported
    with pytest.raises(InputError):
        full.to_array(2)


def test_rounds_can_arrive_out_of_order():
    metrics = RoundMetrics()
    metrics.update(2, SAME, GT)
    assert metrics.num_rounds == 3
    assert set(metrics.summary()) == {"mIoU_round2", "oIoU_round2", "P@0.5_round2", "n_round2"}


def test_probabilities_count_as_nonzero_and_bad_inputs_raise():
    assert _single(SAME.astype(np.uint8), GT)["oIoU_round0"] == 1.0
    metrics = RoundMetrics()
    with pytest.raises(InputError):
        metrics.update(0, SAME, np.zeros((5, 5), bool))
    with pytest.raises(InputError):
        metrics.update(0, SAME[None], GT[None])
    with pytest.raises(InputError):
        metrics.update(-1, SAME, GT)
    with pytest.raises(InputError):
        metrics.update(0, SAME, GT, pred_box=[0, 0, 1])
    with pytest.raises(InputError):
        metrics.add_conversation([SAME], [GT, GT])
    with pytest.raises(InputError):
        RoundMetrics.from_array(np.zeros((2, 3)))
