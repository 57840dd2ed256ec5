"""The recipe's CLIP stage (``segllm_jax.train.clip_pretrain``): its patch labels equal a direct count of the
instance map, and bad configs are refused. A short run (its loss falls; it exports a whole segllm checkpoint in
which only the vision tower moved from the seed's init) is the first stage of the learning smoke run,
``tests/learning/test_mrshapes_training.py``."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_config_errors_are_specific(tmp_path):
    data = MRShapesData(str(tmp_path), n_scenes=4)
    model = SegLLMConfig.tiny_mrshapes(data.vocab_size)
    with pytest.raises(ConfigError, match="training scenes"):
        clip_pretrain.ClipPretrainConfig(model=model, data=data, batch_size=8)
    with pytest.raises(ConfigError, match="steps"):
        clip_pretrain.ClipPretrainConfig(model=model, data=data, steps=0, batch_size=2)
