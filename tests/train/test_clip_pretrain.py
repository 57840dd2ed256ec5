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


def test_shape_crops_are_cut_from_the_instance_map_and_their_heads_learn():
    """``crop_weight`` > 0: each shape gives one crop, labelled with its colour and kind, holding the shape's
    pixels on black, cut to its extent and pasted top-left in a square (cut here from the instance map directly);
    heads on the tower's CLS feature of the crop (what ``SegLLM.mask_encode`` projects) learn both labels."""
    import optax
    from flax import nnx

    from segllm_jax.checkpoint import build_model
    from segllm_jax.preprocess import clip_image

    vision = SegLLMConfig.tiny_mrshapes(100).vision
    grid = vision.image_size // vision.patch_size
    data = MRShapesData("unused", n_scenes=6)  # scene_arrays regenerates the scenes from the seed
    arrays = clip_pretrain.scene_arrays(data, "train", 6, vision.image_size, grid, crops=True)
    scenes = [mrshapes.scene_and_conversation(0, "train", i, data.max_rounds)[0] for i in range(6)]
    assert arrays.crop_labels.tolist() == [[clip_pretrain.COLORS.index(c), mrshapes.KINDS.index(k)]
                                           for s in scenes for c, k in zip(s.colors, s.kinds, strict=True)]
    scene, at = scenes[1], len(scenes[0].shapes)
    for k in range(len(scene.shapes)):
        inside = scene.instance_map == k
        rows, cols = np.nonzero(inside)
        cut = np.where(inside[..., None], scene.image, 0)[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        square = np.zeros((max(cut.shape[:2]),) * 2 + (3,), np.uint8)
        square[:cut.shape[0], :cut.shape[1]] = cut
        np.testing.assert_array_equal(arrays.crops[at + k], clip_image(square, vision.image_size))

    probe = clip_pretrain.PatchProbe(build_model("clip_vision", vision), grid, nnx.Rngs(1), crops=True)
    optimizer = nnx.Optimizer(probe, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(probe, optimizer, *batch):
        (_, terms), grads = nnx.value_and_grad(clip_pretrain._loss, has_aux=True)(probe, *batch, 1.0)
        optimizer.update(probe, grads)
        return terms

    batch = [np.asarray(a[:8]) for a in arrays]
    curve = [step(probe, optimizer, *batch) for _ in range(40)]
    for name in clip_pretrain.CROP_HEADS:
        assert float(curve[-1][name]) < 0.5 * float(curve[0][name]), name
