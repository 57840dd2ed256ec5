"""The learning proof's training presets (``configs/tiny_mrshapes*.py`` / ``mrshapes_cpu``): a short run of
every stage of the recipe, with the real command, learns; from-scratch training trains the parts
architecture.md §T12 freezes; ``train_only`` trains what it names; a data folder prepared with other arguments
is refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segllm_jax.checkpoint import build_model, flat_arrays, load_model
from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.errors import ConfigError
from segllm_jax.train import clip_pretrain
from segllm_jax.train import step as S
from segllm_jax.train.config import HIPIE_PARAMS, mrshapes_cpu
from segllm_jax.train.loop import load_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 16  # per stage of the smoke run: enough for every loss to fall, see test_short_run_of_every_stage_learns


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


def test_train_only_trains_what_it_names_within_the_freezing_rule(tmp_path):
    mixture, tokenizer_dir, vocab = prepare_tiny_mrshapes(str(tmp_path), n_scenes=4)
    cfg = mrshapes_cpu(mixture, tokenizer_dir, vocab, train_only=HIPIE_PARAMS, box_aid_weight=1.0)
    keys = S.abstract_structure(cfg).keys
    trainable, frozen = S.split_trainable(dict.fromkeys(keys), cfg)
    hipie = {k for k in keys if any(re.search(p, k) for p in HIPIE_PARAMS) and S.is_trainable(k, False)}
    assert set(trainable) == hipie | {k for k in keys if k.startswith("box_aid/")}  # aid heads always train
    assert any(k.startswith("llm/layers/") for k in frozen) and any(k.startswith("vision_tower/") for k in frozen)
    for bad, match in ((("(",), "regular expression"), ((), "non-empty"), ("^segmentator/", "tuple")):
        with pytest.raises(ConfigError, match=match):
            cfg.replace(train_only=bad)


def test_prepared_folder_with_other_arguments_is_refused(tmp_path):
    prepare_tiny_mrshapes(str(tmp_path), n_scenes=3, eval_scenes=2)
    assert len(json.loads((tmp_path / "conversations" / "mrshapes_test.json").read_text())) == 2
    with pytest.raises(ConfigError, match="n_scenes"):
        prepare_tiny_mrshapes(str(tmp_path), n_scenes=5, eval_scenes=2)


def test_a_config_describes_its_data_and_the_train_command_writes_it(tmp_path, monkeypatch):
    """Loading a config generates nothing; preparing its ``prepare_data`` (what ``train`` does first) writes
    the tokenizer the config's model was sized for."""
    monkeypatch.setenv("SEGLLM_TINY_DATA", str(tmp_path / "data"))
    config = load_config(REPO / "configs" / "tiny_train.py")
    assert not (tmp_path / "data").exists()
    assert config.prepare_data.prepare() == config.model.llm.vocab_size
    assert Path(config.tokenizer_dir).is_dir() and (tmp_path / "data" / "READY.json").is_file()


def _train(config: str, workdir: Path, env: dict) -> list[dict]:
    subprocess.run([sys.executable, "-m", "segllm_jax.apps.cli", "train", "--config", str(REPO / "configs" / config),
                    "--workdir", str(workdir)], env=env, check=True, cwd=REPO, timeout=900)
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_of_every_stage_learns(tmp_path, monkeypatch):
    """The recipe's five commands, shortened and chained through ``$SEGLLM_MRSHAPES_RUN`` as the recipe script
    chains them: the CLIP stage (its patch loss falls; its export moved the vision tower only, and a finished
    stage is not run twice), the two LLM-only reading stages (their reading aids are trained, HIPIE is not),
    stage 1 (grounding, from the reading LLM: HIPIE's loss falls) and stage 2 (the benchmark's conversations,
    from stage 1's exported model: its first HIPIE losses are below stage 1's first ones, and it keeps
    falling)."""
    env = {"SEGLLM_MRSHAPES_DATA": str(tmp_path / "data"), "SEGLLM_MRSHAPES_STEPS": str(STEPS),
           "SEGLLM_MRSHAPES_SCENES": "48", "SEGLLM_MRSHAPES_RUN": str(tmp_path)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    env = dict(os.environ)
    clip = _train("tiny_mrshapes_clip.py", tmp_path / "clip", env)
    assert np.mean([r["loss"] for r in clip[-4:]]) < 0.8 * np.mean([r["loss"] for r in clip[:4]])
    summary = json.loads((tmp_path / "clip" / "summary.json").read_text())
    assert set(summary["val_accuracy"]) == {"color", "kind", "background", "row", "col"}
    _, model_config, exported = load_model(tmp_path / "clip" / "model")
    init, trained = flat_arrays(build_model("segllm", model_config, seed=0)), flat_arrays(exported)
    assert init.keys() == trained.keys()
    moved = {k for k in init if not np.array_equal(init[k], trained[k])}
    assert moved and all(k.startswith("vision_tower/") for k in moved), sorted(moved)[:5]
    assert clip_pretrain.train(load_config(REPO / "configs" / "tiny_mrshapes_clip.py"), tmp_path / "clip") == []

    for stage, config in (("reading", "tiny_mrshapes_reading.py"), ("reading_mix", "tiny_mrshapes_reading_mix.py")):
        reading = _train(config, tmp_path / stage, env)
        assert [r["step"] for r in reading] == list(range(STEPS))
        assert "loss_hipie" not in reading[0] and {"loss_box_aid", "loss_attention_aid"} <= reading[0].keys()
        assert np.mean([r["loss"] for r in reading[-6:]]) < np.mean([r["loss"] for r in reading[:6]]), stage
        assert (tmp_path / stage / "model" / "config.json").is_file()

    stage1 = _train("tiny_mrshapes_stage1.py", tmp_path / "stage1", env)
    assert [r["step"] for r in stage1] == list(range(STEPS))
    assert np.mean([r["loss_hipie"] for r in stage1[-6:]]) < np.mean([r["loss_hipie"] for r in stage1[:6]])
    assert (tmp_path / "stage1" / "model" / "training_params").is_dir()  # the DN label encoder travels on
    before, after = (flat_arrays(load_model(tmp_path / stage / "model")[2]) for stage in ("reading_mix", "stage1"))
    moved = {k.split("/")[0] for k in before if not np.array_equal(before[k], after[k])}
    assert {"segmentator", "segmentator_predictor", "llm"} <= moved, moved  # it starts from the reading LLM

    stage2 = _train("tiny_mrshapes.py", tmp_path / "stage2", env)
    assert [r["step"] for r in stage2] == list(range(STEPS))
    assert np.mean([r["loss_hipie"] for r in stage2[:6]]) < np.mean([r["loss_hipie"] for r in stage1[:6]])
    assert np.mean([r["loss"] for r in stage2[-6:]]) < np.mean([r["loss"] for r in stage2[:6]])
    assert (tmp_path / "stage2" / "model" / "config.json").is_file()
    for curve in ("loss.png", "iou_train.png"):  # the run's smoothed curves, written when it ends
        assert (tmp_path / "stage2" / curve).stat().st_size > 0, curve
