"""The learning proof's training preset (``configs/tiny_mrshapes.py`` / ``mrshapes_cpu``): a short run of
the real command with the HIPIE term learns, from-scratch training trains the parts architecture.md §T12 freezes,
and a data folder prepared with other arguments is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.errors import ConfigError
from segllm_jax.train import step as S
from segllm_jax.train.config import mrshapes_cpu

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


def test_a_config_describes_its_data_and_the_train_command_writes_it(tmp_path, monkeypatch):
    """Loading a config generates nothing; preparing its ``prepare_data`` (what ``train`` does first) writes
    the tokenizer the config's model was sized for."""
    from segllm_jax.train.loop import load_config

    monkeypatch.setenv("SEGLLM_TINY_DATA", str(tmp_path / "data"))
    config = load_config(REPO / "configs" / "tiny_train.py")
    assert not (tmp_path / "data").exists()
    assert config.prepare_data.prepare() == config.model.llm.vocab_size
    assert Path(config.tokenizer_dir).is_dir() and (tmp_path / "data" / "READY.json").is_file()


def _train(config: str, workdir: Path, env: dict) -> list[dict]:
    subprocess.run([sys.executable, "-m", "segllm_jax.apps.cli", "train", "--config", str(REPO / "configs" / config),
                    "--workdir", str(workdir)], env=env, check=True, cwd=REPO, timeout=900)
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_of_both_stages_learns(tmp_path):
    """The recipe's two commands, shortened: stage 1 (grounding conversations) for 30 steps, then stage 2
    (the benchmark's conversations) from stage 1's exported model for 30 steps. Stage 1's total loss
    falls well below its start; stage 2 starts from it, not from scratch (its first HIPIE losses are
    below stage 1's first ones) and keeps falling."""
    env = {**os.environ, "SEGLLM_MRSHAPES_DATA": str(tmp_path / "data"), "SEGLLM_MRSHAPES_STEPS": "30",
           "SEGLLM_MRSHAPES_SCENES": "48", "SEGLLM_MRSHAPES_STAGE1": str(tmp_path / "stage1" / "model")}
    stage1 = _train("tiny_mrshapes_stage1.py", tmp_path / "stage1", env)
    assert [r["step"] for r in stage1] == list(range(30))
    first, last = np.mean([r["loss"] for r in stage1[:8]]), np.mean([r["loss"] for r in stage1[-8:]])
    assert last < 0.8 * first, (first, last)
    assert np.mean([r["loss_hipie"] for r in stage1[-8:]]) < np.mean([r["loss_hipie"] for r in stage1[:8]])
    assert (tmp_path / "stage1" / "model" / "training_params").is_dir()  # the DN label encoder travels on

    stage2 = _train("tiny_mrshapes.py", tmp_path / "stage2", env)
    assert [r["step"] for r in stage2] == list(range(30))
    assert np.mean([r["loss_hipie"] for r in stage2[:8]]) < np.mean([r["loss_hipie"] for r in stage1[:8]])
    assert np.mean([r["loss"] for r in stage2[-8:]]) < np.mean([r["loss"] for r in stage2[:8]])
    assert (tmp_path / "stage2" / "model" / "config.json").is_file()
    for curve in ("loss.png", "iou_train.png"):  # the run's smoothed curves, written when it ends
        assert (tmp_path / "stage2" / curve).stat().st_size > 0, curve
