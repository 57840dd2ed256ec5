"""The learning proof's training preset (``configs/tiny_mrshapes.py`` / ``mrshapes_cpu``): a short run of
the real command with the HIPIE term learns, from-scratch training trains the parts spec §5.1 freezes,
and a data folder prepared with other arguments is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segllm_jax.errors import ConfigError
from segllm_jax.train import step as S
from segllm_jax.train.config import mrshapes_cpu, prepare_tiny_mrshapes

REPO = Path(__file__).resolve().parents[2]


def test_from_scratch_trains_what_spec_5_1_freezes_but_not_frozen_bn(tmp_path):
    mixture, tokenizer_dir, vocab = prepare_tiny_mrshapes(str(tmp_path), n_scenes=4)
    cfg = mrshapes_cpu(mixture, tokenizer_dir, vocab)
    keys = S.abstract_structure(cfg).keys
    trainable, frozen = S.split_trainable(dict.fromkeys(keys), cfg)
    for prefix in ("llm/embed_tokens/", "llm/lm_head/", "vision_tower/", "segmentator/backbone/stem/"):
        assert any(k.startswith(prefix) for k in trainable), prefix
    assert frozen and all("/norm/" in k and k.startswith("segmentator/backbone/") for k in frozen)
    spec_trainable, _ = S.split_trainable(dict.fromkeys(keys), cfg.replace(freeze_pretrained=True))
    assert set(spec_trainable) < set(trainable)


def test_prepared_folder_with_other_arguments_is_refused(tmp_path):
    prepare_tiny_mrshapes(str(tmp_path), n_scenes=3, eval_scenes=2)
    assert len(json.loads((tmp_path / "conversations" / "mrshapes_test.json").read_text())) == 2
    with pytest.raises(ConfigError, match="n_scenes"):
        prepare_tiny_mrshapes(str(tmp_path), n_scenes=5, eval_scenes=2)


def test_short_run_of_the_config_learns(tmp_path):
    """``segllm-jax train --config configs/tiny_mrshapes.py`` for 40 steps on its own data: the total loss
    (LM + HIPIE + prompt L2) of the last 10 steps is well below that of the first 10."""
    env = {**os.environ, "SEGLLM_MRSHAPES_DATA": str(tmp_path / "data"), "SEGLLM_MRSHAPES_STEPS": "40",
           "SEGLLM_MRSHAPES_SCENES": "64"}
    subprocess.run([sys.executable, "-m", "segllm_jax.cli", "train", "--config", str(REPO / "configs/tiny_mrshapes.py"),
                    "--workdir", str(tmp_path / "run")], env=env, check=True, cwd=REPO, timeout=900)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(40))
    first, last = np.mean([r["loss"] for r in rows[:10]]), np.mean([r["loss"] for r in rows[-10:]])
    assert last < 0.8 * first, (first, last)
    assert np.mean([r["loss_hipie"] for r in rows[-10:]]) < np.mean([r["loss_hipie"] for r in rows[:10]])
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    for curve in ("loss.png", "iou_train.png"):  # the run's smoothed curves, written when it ends
        assert (tmp_path / "run" / curve).stat().st_size > 0, curve
