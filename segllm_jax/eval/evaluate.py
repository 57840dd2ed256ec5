"""``segllm-jax eval``: per-round gIoU / cIoU / P@0.5 of a checkpoint on conversation data (architecture.md §E2).

Two modes, as the original evaluates:

* ``teacher``: one forward per conversation; every reference is encoded from its GROUND-TRUTH
  mask (``eval_use_gt_mask_encode=True``), as for MR-PACO / ReasonSeg.
* ``autoregressive``: the original's "Jacobi" evaluation of MR-RefCOCO. Iteration 0 uses the GT
  encodings; after each forward every predicted mask/box replaces the encodings of all later
  references to that round's target, and the pass repeats (as many times as the conversation has
  rounds), so each round finally sees the model's own earlier answers.

``ablate_memory=True`` zeroes the mask-encode and box-encode embeddings (gate 0 instead of the
evaluation's 0.5): the no-memory ablation. IoUs are counted in the HIPIE frame, as the original does.

``best_query=True`` (a diagnosis, not a result) also scores, per round, the mask of the HIPIE query that
overlaps the ground truth best, whatever its score: the answer a perfect choice among the decoder's
queries would give for the same prompt. Its gap to the real answer is the share of the error that is
*which* object was chosen (grounding); its own gap to 1 is how well the chosen objects are segmented.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from segllm_jax import batch as batching
from segllm_jax.checkpoint import Loaded
from segllm_jax.data.conversations import parse_conversation
from segllm_jax.data.example import Example, collate_inputs
from segllm_jax.data.example_builder import ExampleBuilder
from segllm_jax.data.mrshapes import question_type
from segllm_jax.data.registers import AnnotationRegistry
from segllm_jax.errors import InputError, SegLLMError
from segllm_jax.eval.charts import line_chart
from segllm_jax.eval.data_spec import EvalData, read_entries
from segllm_jax.eval.metrics import RoundMetrics
from segllm_jax.models.hipie.model import Hipie, image_features_jit, predict, segment_jit, selected_mask_jit
from segllm_jax.outputs import atomic_write_text, make_output_folder
from segllm_jax.prompt import ConversationEncoder

Mode = Literal["teacher", "autoregressive"]


@nnx.jit
def _prompts(model, batch: batching.ConversationBatch) -> jax.Array:
    return batching.forward(model, batch)[1]


@nnx.jit
def _query_masks(hipie: Hipie, outputs) -> jax.Array:
    return hipie.all_pred_masks(outputs) > 0  # [N, Q, H/4, W/4]


def best_query_masks(hipie: Hipie, levels, prompts: jax.Array, gt_masks: np.ndarray) -> np.ndarray:
    """Per prompt, the frame mask [N, H, W] of the foreground query whose stride-4 mask has the highest IoU
    with the GT (GT reduced to stride 4 by majority): the oracle choice among the decoder's queries."""
    n = prompts.shape[0]
    out = segment_jit(hipie, levels, prompts, jnp.zeros(n, jnp.int32))
    small = np.asarray(_query_masks(hipie, out))[:, hipie.cfg.num_bg_queries:]  # [N, Qfg, h, w]
    h, w = small.shape[-2:]
    gt = np.asarray(gt_masks[:n], bool)
    gt_small = gt.reshape(n, h, gt.shape[1] // h, w, gt.shape[2] // w).mean((2, 4)) > 0.5  # [N, h, w]
    inter = (small & gt_small[:, None]).sum((-2, -1))
    union = (small | gt_small[:, None]).sum((-2, -1))
    best = np.argmax(inter / np.maximum(union, 1), axis=1) + hipie.cfg.num_bg_queries
    return np.asarray(selected_mask_jit(hipie, out, jnp.asarray(best, jnp.int32))[1])


def _evaluate_one(loaded: Loaded, example: Example, entry: dict, mode: Mode, gate: float, limit_rounds: int | None,
                  best_query: bool = False):
    cfg = loaded.config
    convs, clip, image_of_row, references = collate_inputs([example])
    levels = image_features_jit(loaded.model.segmentator, jnp.asarray(example.hipie_image)[None])
    rounds = parse_conversation(entry, limit_rounds).rounds[: len(convs[0].rounds)]
    target_ids = [r.target.target_id for r in rounds]
    ref_ids = [[ref.mask_id for ref in r.references] for r in rounds]
    passes = len(rounds) if mode == "autoregressive" else 1
    for _ in range(passes):
        batch = batching.collate(convs, clip, image_of_row, references, gate=gate,
                                 pad_to=batching.bucketed(convs[0].num_tokens))
        prompts = _prompts(loaded.model, batch)  # [N, 8, 768], one per round
        pred = predict(loaded.model.segmentator, None, prompts, np.zeros(len(rounds), np.int32), levels=levels)
        if mode == "teacher":
            break
        # Jacobi step: later references to round j's target now use round j's prediction
        predicted = [batching.Reference.of_prediction(example.hipie_image, pred.masks[j], pred.boxes_xyxy[j],
                                                      cfg.hipie_image_size, cfg.vision.image_size)
                     for j in range(len(rounds))]
        updated = []
        for k in range(len(rounds)):
            row = []
            for mask_id, gt_ref in zip(ref_ids[k], references[0][k], strict=True):
                j = target_ids.index(mask_id) if mask_id in target_ids else k
                row.append(predicted[j] if j < k else gt_ref)
            updated.append(row)
        references = [updated]
    gt = example.target_masks[: len(rounds)]
    best = best_query_masks(loaded.model.segmentator, levels, prompts, gt) if best_query else None
    return pred.masks, gt, pred.boxes_xyxy, best


def evaluate(loaded: Loaded, data: EvalData, mode: Mode = "autoregressive", *, ablate_memory: bool = False,
             limit: int | None = None, limit_rounds: int | None = 6, progress: bool = True,
             failures: list[dict] | None = None, by_type: dict[str, RoundMetrics] | None = None,
             best_query: RoundMetrics | None = None) -> RoundMetrics:
    """Metrics per round over every conversation of ``data`` (the first ``limit`` of each file).

    With a ``by_type`` dict, every round is also pooled by its question type
    (:func:`segllm_jax.data.mrshapes.question_type`), in round slot 0 of ``by_type[type]``. With a
    ``best_query`` accumulator, the oracle choice among the queries is scored into it (module docstring).

    With a ``failures`` list, a conversation that cannot be used (missing image, bad annotation) is
    appended to it as ``{"id", "error"}`` and skipped; without one, its error is raised.
    """
    if mode not in ("teacher", "autoregressive"):
        raise InputError(f"mode must be 'teacher' or 'autoregressive', not {mode!r}.")
    cfg = loaded.config
    builder = ExampleBuilder(ConversationEncoder(loaded.tokenizer, cfg.num_image_tokens),
                             AnnotationRegistry(data.registers, data.annotations_root), Path(data.images_root),
                             limit_rounds, cfg.context_length, cfg.vision.image_size, cfg.hipie_image_size,
                             is_eval=True)
    entries = [e for path in data.paths for e in read_entries(path, limit)]
    gate = 0.0 if ablate_memory else cfg.eval_reference_gate
    metrics = RoundMetrics()
    for n, entry in enumerate(tqdm(entries, desc=f"eval ({mode})", unit="conv", disable=not progress)):
        try:
            example = builder.build(entry)
            pred_masks, gt_masks, boxes, best = _evaluate_one(loaded, example, entry, mode, gate, limit_rounds,
                                                              best_query is not None)
        except SegLLMError as e:
            if failures is None:
                raise
            failures.append({"id": str(entry.get("id", f"#{n}")), "error": str(e)})
            continue
        metrics.add_conversation(list(pred_masks), list(gt_masks), list(boxes))
        if best_query is not None:
            best_query.add_conversation(list(best), list(gt_masks))
        if by_type is not None:
            rounds = parse_conversation(entry, limit_rounds).rounds
            # rounds past the context length were cut (no prediction): zip stops at the last predicted one
            for r, pred, gt, box in zip(rounds, pred_masks, gt_masks, boxes, strict=False):
                kind = question_type(r.question, r.target.task_type)
                by_type.setdefault(kind, RoundMetrics()).update(0, pred, gt, box)
    return metrics


def plot_rounds(results: dict[str, RoundMetrics], path: str | Path, metric: str = "oIoU") -> Path:
    """A PNG line chart of ``metric`` per round (1-based) for each named result."""
    series = {}
    for name, m in results.items():
        summary = m.summary()
        rounds = [i for i in range(m.num_rounds) if f"{metric}_round{i}" in summary]
        series[name] = ([i + 1 for i in rounds], [summary[f"{metric}_round{i}"] for i in rounds])
    ticks = range(1, max(m.num_rounds for m in results.values()) + 1)
    return line_chart(series, path, f"{metric} per round", y_range=(0.0, 1.0), x_ticks=ticks, markers=True)


def write_report(results: dict[str, RoundMetrics], out: str | Path,
                 failures: dict[str, list[dict]] | None = None,
                 by_type: dict[str, dict[str, RoundMetrics]] | None = None) -> None:
    """``metrics.json`` (each mode's summary, plus ``"failed"``: the conversations skipped, with their
    ids and errors), ``metrics.md`` and ``iou_per_round.png`` in ``out``, each written atomically."""
    out = make_output_folder(out)
    failures = failures or {}
    by_type = by_type or {}
    summaries = {k: {**m.summary(), "failed": failures.get(k, []),
                     **({"by_type": {t: tm.summary() for t, tm in by_type[k].items()}} if k in by_type else {})}
                 for k, m in results.items()}
    atomic_write_text(out / "metrics.json", json.dumps(summaries, indent=2) + "\n")
    sections = [f"### {k}\n\n{m.markdown()}" + (f"\n\nBy question type:\n\n{RoundMetrics.by_type_markdown(by_type[k])}"
                                                 if by_type.get(k) else "") for k, m in results.items()]
    atomic_write_text(out / "metrics.md", "\n\n".join(sections) + "\n")
    partial = out / f".iou_per_round.{os.getpid()}.png"  # matplotlib picks the format from the suffix
    try:
        plot_rounds(results, partial)
        os.replace(partial, out / "iou_per_round.png")
    finally:
        partial.unlink(missing_ok=True)


def run_eval(loaded: Loaded, data_spec: str, out: str | Path, modes: Sequence[Mode], *, ablate_memory: bool = False,
             limit: int | None = None, best_query: bool = False) -> tuple[dict[str, RoundMetrics], list[dict]]:
    """Evaluates and writes the report; returns the metrics and the conversations that failed (each
    ``{"id", "error"}``, once even if several modes met it). Refuses (writing nothing) when every
    conversation failed: there is nothing to report. ``best_query`` adds a "MODE (best query)" result
    per mode (the diagnosis in the module docstring)."""
    data = EvalData.parse(data_spec).check()
    results, failures, by_type = {}, {}, {}
    for mode in modes:
        for ablate in (False, True) if ablate_memory else (False,):
            name = f"{mode} (no memory)" if ablate else mode
            failures[name], by_type[name] = [], {}
            oracle = RoundMetrics() if best_query and not ablate else None
            results[name] = evaluate(loaded, data, mode, ablate_memory=ablate, limit=limit,
                                     failures=failures[name], by_type=by_type[name], best_query=oracle)
            if oracle is not None:
                results[f"{mode} (best query)"] = oracle
    if all(m.num_rounds == 0 for m in results.values()):
        first = next((f for fs in failures.values() for f in fs), None)
        raise InputError("no conversation could be evaluated" + (f"; the first, {first['id']}: {first['error']}"
                                                                  if first else "; the data holds none."))
    write_report(results, out, failures, by_type)
    unique = {(f["id"], f["error"]): f for fs in failures.values() for f in fs}
    return results, list(unique.values())
