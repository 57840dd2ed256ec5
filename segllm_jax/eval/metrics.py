"""SegLLM's per-round segmentation metrics (architecture.md §E2), host-side NumPy.

For every round index i (0-based position of the ``<seg>`` in its conversation):

* ``mIoU_round{i}`` (= gIoU): mean over masks of ``I / (U + 1e-4)``, with I and U pixel counts.
* ``oIoU_round{i}`` (= cIoU): ``ΣI / ΣU`` over all masks of the round.
* ``P@0.5_round{i}``: fraction of masks whose predicted box has IoU > 0.5 with the GT mask's
  extent box.

The key names are the original's, so numbers can be compared with its results files. Pixel counts
should be taken in the frame the original used (the 1024 resized-and-padded HIPIE frame, §O28);
this module does not resize.

Empty masks are handled exactly as the original formulas do, which is worth knowing because other
evaluators (e.g. LISA's) score "both empty" as a perfect 1.0:

==========================  ======================  ===============================  ==================
case                        gIoU term               cIoU sums                        P@0.5
==========================  ======================  ===============================  ==================
GT empty, pred empty        0 (0 / (0 + 1e-4))      adds nothing to ΣI or ΣU         miss (no GT box)
GT empty, pred non-empty    0                       ΣU += |pred| (lowers cIoU)       miss (no GT box)
GT non-empty, pred empty    0                       ΣU += |GT|                       miss unless an
                                                                                     explicit pred box
                                                                                     overlaps > 0.5
==========================  ======================  ===============================  ==================

Every mask counts in its round's denominator (n) in all three cases. A ratio whose denominator is
zero (no masks, or ΣU = 0) is reported as 0.0, as the original's ``x / (1e-10 + y)`` gives.

Accumulators hold only sums, so shards merge by addition: ``merge`` for objects, or
``to_array(num_rounds)`` → all-reduce (sum) → ``from_array`` across hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from segllm_jax.errors import InputError
from segllm_jax.preprocess import mask_box

MASK_IOU_EPS = 1e-4  # the original's eps in the per-mask IoU (§E2)
BOX_HIT_THRESHOLD = 0.5  # strict ">" as in the original

# Columns of the accumulator array, one row per round.
FIELDS = ("count", "intersection", "union", "iou_sum", "box_hits")
_COUNT, _INTER, _UNION, _IOU, _HITS = range(len(FIELDS))


def box_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """IoU of two xyxy boxes; 0.0 if either is missing or both have zero area."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """Boolean 2-D mask; any nonzero value counts as foreground (threshold probabilities first)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"{name} must be a 2-D mask, got shape {mask.shape}.")
    return mask.astype(bool)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)


class RoundMetrics:
    """Per-round sums of SegLLM's metrics; see the module docstring for the definitions."""

    def __init__(self) -> None:
        self._sums = np.zeros((0, len(FIELDS)), np.float64)  # [R, F]

    @property
    def num_rounds(self) -> int:
        return self._sums.shape[0]

    def update(self, round_index: int, pred_mask: np.ndarray, gt_mask: np.ndarray,
               pred_box: Sequence[float] | np.ndarray | None = None) -> None:
        """Add one predicted mask of round ``round_index``. ``pred_box`` (xyxy, same frame) is the
        model's box; without it the predicted mask's extent box is used."""
        if round_index < 0:
            raise InputError(f"round_index must be >= 0, got {round_index}.")
        pred = _as_mask(pred_mask, "pred_mask")
        gt = _as_mask(gt_mask, "gt_mask")
        if pred.shape != gt.shape:
            raise InputError(f"pred_mask {pred.shape} and gt_mask {gt.shape} must be in the same frame.")
        if pred_box is None:
            box = mask_box(pred)
        else:
            box = np.asarray(pred_box, np.float64)
            if box.shape != (4,) or not np.all(np.isfinite(box)):
                raise InputError(f"pred_box must be 4 finite numbers x0, y0, x1, y1, got {pred_box!r}.")
        inter = float(np.count_nonzero(pred & gt))
        union = float(np.count_nonzero(pred | gt))
        hit = box_iou(box, mask_box(gt)) > BOX_HIT_THRESHOLD
        self._grow(round_index + 1)
        self._sums[round_index] += (1.0, inter, union, inter / (union + MASK_IOU_EPS), float(hit))

    def add_conversation(self, pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray],
                         pred_boxes: Sequence[np.ndarray | None] | None = None) -> None:
        """Add one conversation's masks in round order (mask r belongs to round r)."""
        n = len(gt_masks)
        if len(pred_masks) != n or (pred_boxes is not None and len(pred_boxes) != n):
            raise InputError("a conversation needs as many predicted masks (and boxes) as GT masks.")
        boxes = pred_boxes if pred_boxes is not None else [None] * n
        for r, (pred, gt, box) in enumerate(zip(pred_masks, gt_masks, boxes, strict=True)):
            self.update(r, pred, gt, box)

    def merge(self, other: RoundMetrics) -> RoundMetrics:
        """A new accumulator holding both shards' sums."""
        rounds = max(self.num_rounds, other.num_rounds)
        return RoundMetrics.from_array(self.to_array(rounds) + other.to_array(rounds))

    def to_array(self, num_rounds: int | None = None) -> np.ndarray:
        """[R, len(FIELDS)] float64 sums, zero-padded to ``num_rounds`` rows so that every host
        contributes the same shape to an all-reduce."""
        rounds = self.num_rounds if num_rounds is None else num_rounds
        if rounds < self.num_rounds:
            raise InputError(f"num_rounds={rounds} would drop rounds; this accumulator has {self.num_rounds}.")
        out = np.zeros((rounds, len(FIELDS)), np.float64)
        out[: self.num_rounds] = self._sums
        return out

    @classmethod
    def from_array(cls, array: np.ndarray) -> RoundMetrics:
        """Inverse of ``to_array`` (e.g. after summing arrays across hosts)."""
        array = np.asarray(array, np.float64)
        if array.ndim != 2 or array.shape[1] != len(FIELDS):
            raise InputError(f"metric arrays have shape [rounds, {len(FIELDS)}], got {array.shape}.")
        metrics = cls()
        metrics._sums = array.copy()
        return metrics

    def summary(self) -> dict[str, float]:
        """``{mIoU_round{i}, oIoU_round{i}, P@0.5_round{i}, n_round{i}}`` for every round with masks."""
        s = self._sums
        giou = _ratio(s[:, _IOU], s[:, _COUNT])
        ciou = _ratio(s[:, _INTER], s[:, _UNION])
        p50 = _ratio(s[:, _HITS], s[:, _COUNT])
        out: dict[str, float] = {}
        for i in np.flatnonzero(s[:, _COUNT] > 0):
            out[f"mIoU_round{i}"] = float(giou[i])
            out[f"oIoU_round{i}"] = float(ciou[i])
            out[f"P@0.5_round{i}"] = float(p50[i])
            out[f"n_round{i}"] = float(s[i, _COUNT])
        return out

    def markdown(self) -> str:
        """A markdown table, one row per round with masks (values in percent, like the paper). Rounds are
        numbered as people count them (1 = the first round); the keys of :meth:`summary` index from 0."""
        summary = self.summary()
        lines = ["| round | n | gIoU (mIoU) | cIoU (oIoU) | P@0.5 |", "|---:|---:|---:|---:|---:|"]
        for i in range(self.num_rounds):
            if f"n_round{i}" in summary:
                values = (summary[f"{k}_round{i}"] for k in ("mIoU", "oIoU", "P@0.5"))
                cells = " | ".join(f"{100 * v:.2f}" for v in values)
                lines.append(f"| {i + 1} | {int(summary[f'n_round{i}'])} | {cells} |")
        return "\n".join(lines)

    @staticmethod
    def by_type_markdown(by_type: Mapping[str, "RoundMetrics"]) -> str:
        """A markdown table, one row per question type (each type's masks pooled in its round slot 0)."""
        lines = ["| question type | n | gIoU | cIoU | P@0.5 |", "|---|---:|---:|---:|---:|"]
        for name in sorted(by_type):
            s = by_type[name].summary()
            if "n_round0" in s:
                cells = " | ".join(f"{100 * s[f'{k}_round0']:.2f}" for k in ("mIoU", "oIoU", "P@0.5"))
                lines.append(f"| {name} | {int(s['n_round0'])} | {cells} |")
        return "\n".join(lines)

    def _grow(self, rounds: int) -> None:
        if rounds > self.num_rounds:
            self._sums = self.to_array(rounds)
