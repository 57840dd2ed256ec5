"""The trained tiny checkpoint that ships in ``checkpoints/tiny_mrshapes``: it loads through the public
loader, reaches the test IoU recorded when it was trained (on a subset of the test split, ± 2 points),
still needs its memory at the referring rounds, and drives ``make demo``'s conversation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segllm_jax.apps.demo import SHIPPED_CHECKPOINT, run_demo
from segllm_jax.checkpoint import load
from segllm_jax.data import mrshapes
from segllm_jax.eval.evaluate import EvalData, evaluate

RESULTS = json.loads((SHIPPED_CHECKPOINT / "RESULTS.json").read_text())
SUBSET = RESULTS["ci_subset"]


@pytest.fixture(scope="module")
def loaded():
    return load(SHIPPED_CHECKPOINT)


@pytest.fixture(scope="module")
def test_subset(tmp_path_factory) -> EvalData:
    """The first conversations of the test split the checkpoint was evaluated on (same seed: same scenes)."""
    out = tmp_path_factory.mktemp("mrshapes")
    mrshapes.write_split(out, "test", SUBSET["conversations"], SUBSET["seed"], max_rounds=SUBSET["max_rounds"])
    return EvalData.parse(f"mrshapes:{out}:test")


def test_checkpoint_is_small_and_documented():
    size = sum(f.stat().st_size for f in SHIPPED_CHECKPOINT.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, size
    assert {"command", "seed", "train_wall_s", "test"} <= set(RESULTS)


def test_recorded_test_iou_is_reached(loaded, test_subset):
    got = evaluate(loaded, test_subset, "autoregressive", progress=False).summary()
    want = SUBSET["autoregressive"]
    assert {k: v for k, v in got.items() if k.startswith("n_")} == {k: v for k, v in want.items() if k.startswith("n_")}
    for key in (k for k in want if k.startswith(("mIoU", "oIoU"))):  # IoUs within 2 points of the record
        assert abs(got[key] - want[key]) <= 0.02, (key, got[key], want[key])


def test_demo_conversation_reproduces_its_recorded_ious(tmp_path):
    ious = run_demo(tmp_path, seed=RESULTS["demo"]["seed"])
    assert len(ious) == 4
    np.testing.assert_allclose(ious, RESULTS["demo"]["ious"], atol=0.02)
    for name in ["scene.png", "rounds.png"] + [f"round_{r}.png" for r in range(1, 5)]:
        assert (tmp_path / name).stat().st_size > 0, name
