"""Training metrics: per-round train IoU of the HIPIE term, and TensorBoard events of a tiny run."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.tokenizer import SegTokenizer
from segllm_jax.train import batching as B
from segllm_jax.train import loop
from segllm_jax.train import step as S
from segllm_jax.train.config import tiny_cpu


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_mrshapes(str(tmp_path_factory.mktemp("tiny")), n_scenes=8)


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in the TensorBoard event files under ``folder``.

    Event files are TFRecords: [uint64 length][uint32 crc][payload][uint32 crc], payload an ``Event``.
    """
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no events file under {folder}"
    for path in files:
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_round_ious_only_for_present_rounds():
    parts = np.array([[5.0, 10.0], [0.0, 8.0], [3.0, 4.0], [2.0, 2.0]])  # (intersection, union) per prompt
    rounds = np.array([0, 2, 0, 4])
    got = S.round_ious(parts, rounds)
    assert list(got) == ["hipie/iou_round1", "hipie/iou_round3", "hipie/iou_round5"]  # no round 2 or 4
    np.testing.assert_allclose(got["hipie/iou_round1"], (5 / 10 + 3 / 4) / 2, rtol=1e-4)  # per-prompt mean
    assert got["hipie/iou_round3"] == 0.0
    np.testing.assert_allclose(got["hipie/iou_round5"], 1.0, rtol=1e-4)


def test_train_batch_knows_each_prompts_round(data):
    mixture, tokenizer_dir, vocab = data
    cfg = tiny_cpu(mixture, tokenizer_dir, vocab, batch_size=4, max_rounds=1)
    host = next(iter(loop.make_pipeline(cfg, SegTokenizer.from_pretrained(tokenizer_dir), num_epochs=1)))
    batch = B.make_train_batch(host["examples"], cfg, step=3)
    counts = [int(e.seg_positions.size) for e in host["examples"]]
    assert max(counts) > cfg.max_rounds  # the selection really drops rounds
    starts = np.cumsum([0, *counts[:-1]])
    index, rounds = np.asarray(batch.hipie_index), np.asarray(batch.hipie_round)
    row = np.searchsorted(starts, index, side="right") - 1  # conversation of each selected prompt
    np.testing.assert_array_equal(rounds, index - starts[row])
    assert rounds.max() > 0  # not only first rounds: the index is the round, not the selection order
    for r, n in enumerate(counts):
        mine = rounds[row == r]
        assert len(mine) == min(n, cfg.max_rounds) and np.all(np.diff(mine) > 0) and np.all(mine < n)


def test_tiny_hipie_run_logs_round_iou_and_tensorboard(data, tmp_path, monkeypatch):
    """Two steps with the HIPIE term and TensorBoard on (~1.5 min on a busy 2-core CPU, mostly one compile)."""
    mixture, tokenizer_dir, vocab = data
    cfg = tiny_cpu(mixture, tokenizer_dir, vocab, steps=2, checkpoint_every=2, use_hipie_loss=True,
                   tensorboard=True, export_model=False, async_checkpointing=False)
    real_batch, real_step = B.make_train_batch, S.make_train_step
    rounds_seen = []

    def recording_batch(examples, c, step, **kwargs):
        batch = real_batch(examples, c, step, **kwargs)
        rounds_seen.append(sorted(set(np.asarray(batch.hipie_round).tolist())))
        return batch

    def with_pooled_check(structure, c, term):
        train_step = real_step(structure, c, term)

        def checked(state, batch):  # iou_train pooled back from the per-prompt parts the loop splits by round
            state, metrics = train_step(state, batch)
            parts = metrics[f"hipie/{S.PROMPT_IOU}"]
            return state, {**metrics, "check/iou_pooled": parts[:, 0].sum() / (parts[:, 1].sum() + 1e-4)}

        return checked

    monkeypatch.setattr(B, "make_train_batch", recording_batch)
    monkeypatch.setattr(S, "make_train_step", with_pooled_check)
    loop.train(cfg, tmp_path)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and len(rounds_seen) == 2
    for record, rounds in zip(records, rounds_seen, strict=True):
        assert f"hipie/{S.PROMPT_IOU}" not in record
        logged = sorted(k for k in record if k.startswith("hipie/iou_round"))
        assert logged == [f"hipie/iou_round{k + 1}" for k in rounds]  # exactly the rounds of this batch
        assert all(0.0 <= record[k] <= 1.0 for k in logged)
        np.testing.assert_allclose(record["check/iou_pooled"], record["hipie/iou_train"], rtol=1e-5, atol=1e-7)
    print("train IoU:", [{k: round(v, 4) for k, v in r.items() if "/iou_" in k} for r in records])

    scalars = read_scalars(tmp_path / "tensorboard")
    for record in records:
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        assert {"loss", "loss_lm", "loss_hipie", "hipie/iou_train", "lr", "grad_norm"} <= set(numeric)
        for tag, value in numeric.items():
            assert math.isclose(scalars[tag][record["step"]], value, rel_tol=1e-6, abs_tol=1e-30), tag
    tags_of_every_step = {k for r in records for k in r if k != "step"}
    assert set(scalars) == tags_of_every_step
