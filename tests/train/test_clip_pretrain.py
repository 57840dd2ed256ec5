"""The recipe's CLIP stage (``segllm_jax.train.clip_pretrain``): its patch labels equal a direct count of the
instance map, a short run lowers its loss, and it exports a whole segllm checkpoint in which only the vision
tower moved from the seed's init."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segllm_jax.checkpoint import build_model, flat_arrays, load_model
from segllm_jax.config import SegLLMConfig
from segllm_jax.data import mrshapes
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.errors import ConfigError
from segllm_jax.train import clip_pretrain
from segllm_jax.train.aids import COVER_MIN


def test_patch_labels_equal_a_direct_count_of_the_instance_map():
    grid = 8
    for index in range(40):  # a scene whose short side splits into whole patches: the count is exact
        scene, _ = mrshapes.scene_and_conversation(0, "train", index)
        h, w = scene.image_hw
        if min(h, w) % grid == 0 and len(set(scene.colors)) > 2:
            break
    side, k = min(h, w), min(h, w) // grid
    top, left = (h - side) // 2, (w - side) // 2
    crop = scene.instance_map[top:top + side, left:left + side]
    labels = clip_pretrain.patch_labels(scene, grid)
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        block = crop[r * k:(r + 1) * k, c * k:(c + 1) * k]
        counts = np.bincount(block.ravel() + 1, minlength=len(scene.shapes) + 1)[1:] / block.size
        owner = int(counts.argmax())
        want = (1 + clip_pretrain.COLORS.index(scene.colors[owner]), 1 + mrshapes.KINDS.index(scene.kinds[owner])) \
            if counts[owner] >= COVER_MIN else (0, 0)
        assert tuple(labels[p]) == (*want, r, c), p
    assert (labels[:, 0] > 0).any() and (labels[:, 0] == 0).any()


def test_short_stage_learns_and_exports_the_tower_only(tmp_path):
    data = MRShapesData(str(tmp_path / "data"), n_scenes=16, eval_scenes=4)
    model = SegLLMConfig.tiny_mrshapes(data.vocab_size)
    cfg = clip_pretrain.ClipPretrainConfig(model=model, data=data, steps=60, batch_size=8, learning_rate=3e-3)
    records = clip_pretrain.train(cfg, tmp_path / "clip")
    assert [r["step"] for r in records] == list(range(60))
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.7 * first, (first, last)
    summary = json.loads((tmp_path / "clip" / "summary.json").read_text())
    assert set(summary["val_accuracy"]) == {"color", "kind", "background", "row", "col"}

    init = flat_arrays(build_model("segllm", model, seed=0))
    trained = flat_arrays(load_model(tmp_path / "clip" / "model")[2])
    assert init.keys() == trained.keys()
    moved = {k for k in init if not np.array_equal(init[k], trained[k])}
    assert moved and all(k.startswith("vision_tower/") for k in moved), sorted(moved)[:5]
    assert clip_pretrain.train(cfg, tmp_path / "clip") == []  # a finished stage is not run twice


def test_config_errors_are_specific(tmp_path):
    data = MRShapesData(str(tmp_path), n_scenes=4)
    model = SegLLMConfig.tiny_mrshapes(data.vocab_size)
    with pytest.raises(ConfigError, match="training scenes"):
        clip_pretrain.ClipPretrainConfig(model=model, data=data, batch_size=8)
    with pytest.raises(ConfigError, match="steps"):
        clip_pretrain.ClipPretrainConfig(model=model, data=data, steps=0, batch_size=2)
