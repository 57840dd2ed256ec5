"""`segllm-jax eval` on generated MR-Shapes data: both modes, the ablation, the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

import segllm_jax.eval.evaluate as evaluate_module
from segllm_jax.apps.cli import main
from segllm_jax.data import mrshapes
from segllm_jax.data.example_builder import ExampleBuilder
from segllm_jax.eval.evaluate import EvalData, evaluate


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("mrshapes")
    mrshapes.write_split(out, "test", 3, seed=11, max_rounds=3)
    return out


def test_eval_cli_writes_the_report(tiny, split, tmp_path, capsys):
    root, _ = tiny
    code = main(["eval", "--checkpoint", str(root / "converted"), "--data", f"mrshapes:{split}:test",
                 "--out", str(tmp_path / "eval"), "--ablate-memory", "--limit", "1"])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "teacher (no memory)", "autoregressive", "autoregressive (no memory)"}
    for summary in metrics.values():
        assert summary["n_round0"] == 1 and 0.0 <= summary["oIoU_round0"] <= 1.0
        rounds = sum(v for k, v in summary.items() if k.startswith("n_round"))
        assert rounds >= 2 and sum(t["n_round0"] for t in summary["by_type"].values()) == rounds
    assert (tmp_path / "eval" / "iou_per_round.png").stat().st_size > 0
    report = (tmp_path / "eval" / "metrics.md").read_text()
    assert "mIoU" in report and "| question type |" in report


def test_an_oracle_scores_one(tiny, split, monkeypatch):
    """Feeding the ground truth back as the prediction must give IoU 1 in every round: the bookkeeping
    (which mask belongs to which round, the frame, the metric) is right."""
    _, loaded = tiny
    current = {}
    real_build, real_predict = ExampleBuilder.build, evaluate_module.predict

    def build(self, entry):
        current["example"] = real_build(self, entry)
        return current["example"]

    def oracle(*args, **kwargs):
        pred = real_predict(*args, **kwargs)
        gt = current["example"].target_masks[: len(pred.masks)]
        boxes = np.stack([[np.flatnonzero(m.any(0))[0], np.flatnonzero(m.any(1))[0],
                           np.flatnonzero(m.any(0))[-1] + 1, np.flatnonzero(m.any(1))[-1] + 1] for m in gt])
        return pred._replace(masks=gt, boxes_xyxy=boxes.astype(np.float32))

    monkeypatch.setattr(ExampleBuilder, "build", build)
    monkeypatch.setattr(evaluate_module, "predict", oracle)
    by_type = {}
    summary = evaluate(loaded, EvalData.parse(f"mrshapes:{split}:test"), "autoregressive", limit=2,
                       progress=False, by_type=by_type).summary()
    entries = json.loads((split / "conversations" / "mrshapes_test.json").read_text())[:2]
    want = {}
    for entry in entries:  # the types of the rounds, from the generator's own record of each question
        for k, turn in enumerate(entry["conversations"][1::2]):
            payload = turn["value"][len("[MASK-DECODE:"):-1]
            task = payload.split(":")[0] if payload.count(":") >= 4 else None
            kind = mrshapes.question_type(entry["conversations"][2 * k]["value"], task)
            want[kind] = want.get(kind, 0) + 1
    assert {t: int(m.summary()["n_round0"]) for t, m in by_type.items()} == want
    assert all(m.summary()["oIoU_round0"] == pytest.approx(1.0) for m in by_type.values())
    rounds = [k for k in summary if k.startswith("oIoU_round")]
    assert rounds and all(summary[k] == pytest.approx(1.0) for k in rounds)
    assert all(summary[k.replace("oIoU", "P@0.5")] == 1.0 for k in rounds)


def test_best_query_is_the_decoders_best_overlapping_query(tiny, split, tmp_path):
    """``--best-query`` scores, per round, the query whose mask overlaps the GT best: recomputed here
    query by query (each query's own full-frame mask), the choice and the mask must be the same."""
    import jax.numpy as jnp

    from segllm_jax import batch as batching
    from segllm_jax.data.example import collate_inputs
    from segllm_jax.data.registers import AnnotationRegistry
    from segllm_jax.models.hipie.model import image_features_jit, segment_jit, selected_mask_jit
    from segllm_jax.prompt import ConversationEncoder

    root, loaded = tiny
    cfg, hipie = loaded.config, loaded.model.segmentator
    data = EvalData.parse(f"mrshapes:{split}:test")
    builder = ExampleBuilder(ConversationEncoder(loaded.tokenizer, cfg.num_image_tokens),
                             AnnotationRegistry(data.registers, data.annotations_root), split / "images", 6,
                             cfg.context_length, cfg.vision.image_size, cfg.hipie_image_size, is_eval=True)
    example = builder.build(json.loads((split / "conversations" / "mrshapes_test.json").read_text())[0])
    convs, clip, image_of_row, references = collate_inputs([example])
    batch = batching.collate(convs, clip, image_of_row, references, gate=cfg.eval_reference_gate,
                             pad_to=batching.bucketed(convs[0].num_tokens))
    prompts = evaluate_module._prompts(loaded.model, batch)
    levels = image_features_jit(hipie, jnp.asarray(example.hipie_image)[None])
    gt = example.target_masks[: prompts.shape[0]] > 0
    got = evaluate_module.best_query_masks(hipie, levels, prompts, gt)

    n, nb = prompts.shape[0], cfg.hipie.num_bg_queries
    out = segment_jit(hipie, levels, prompts, jnp.zeros(n, jnp.int32))
    small = np.asarray(hipie.all_pred_masks(out)) > 0  # [N, Q, h, w]
    h = small.shape[-2]
    s = gt.shape[-1] // h
    for r in range(n):
        gt_small = gt[r].reshape(h, s, -1, s).mean((1, 3)) > 0.5
        ious = [np.sum(m & gt_small) / max(np.sum(m | gt_small), 1) for m in small[r, nb:]]
        q = nb + int(np.argmax(ious))
        full = np.asarray(selected_mask_jit(hipie, out, jnp.full((n,), q, jnp.int32))[1])[r]
        np.testing.assert_array_equal(got[r], full)

    code = main(["eval", "--checkpoint", str(root / "converted"), "--data", f"mrshapes:{split}:test",
                 "--out", str(tmp_path / "eval"), "--mode", "teacher", "--best-query", "--limit", "1"])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "teacher (best query)"}
    assert metrics["teacher (best query)"]["n_round0"] == metrics["teacher"]["n_round0"] == 1
