"""``Hipie`` composition on the tiny config (no golden files needed): shapes, batching, hooks.

The model is built abstractly and filled with random arrays through ``load_arrays`` (building it
eagerly compiles one XLA program per parameter shape, which is slow on a shared CPU).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.model import Hipie, image_features_jit, predict, segment_jit
from segllm_jax_convert.engine import flat_targets, load_arrays

from .hipie_helpers import all_pred_masks_jit, segment_debug_jit

SIZE = 64


@functools.lru_cache(maxsize=1)
def _tiny() -> Hipie:
    model = nnx.eval_shape(lambda: Hipie(HipieConfig.tiny(), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    arrays = {}
    for path, t in flat_targets(model).items():
        fan_in = int(np.prod(t.shape[:-1])) or 1
        arrays[path] = (rng.normal(size=t.shape) / np.sqrt(fan_in)).astype(np.float32)
    return load_arrays(model, arrays)


def _inputs(n_images: int, n_prompts: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cfg = HipieConfig.tiny()
    images = rng.integers(0, 256, size=(n_images, SIZE, SIZE, 3), dtype=np.uint8)
    prompts = rng.normal(size=(n_prompts, cfg.prompt_tokens, cfg.text_dim)).astype(np.float32)
    return images, prompts


def test_predict_shapes_and_selected_mask_identity() -> None:
    model = _tiny()
    cfg = model.cfg
    images, prompts = _inputs(2, 3)
    index = np.array([1, 0, 1], np.int32)
    pred = predict(model, images, prompts, index)
    assert pred.masks.shape == (3, SIZE, SIZE) and pred.masks.dtype == bool
    assert pred.boxes_xyxy.shape == (3, 4) and pred.scores.shape == (3,)
    assert pred.mask_logits.shape == (3, SIZE // 4, SIZE // 4)
    assert ((pred.sel_query >= cfg.num_bg_queries) & (pred.sel_query < cfg.num_total_queries)).all()
    # the selected-query path equals indexing every query's mask (architecture.md §H2), bit for bit
    levels = image_features_jit(model, jnp.asarray(images))
    out = segment_jit(model, levels, jnp.asarray(prompts), jnp.asarray(index))
    assert out.pred_logits.shape == (3, cfg.num_total_queries, cfg.prompt_tokens)
    assert out.controller_params.shape == (3, cfg.num_total_queries, cfg.controller_out)
    every = np.asarray(all_pred_masks_jit(model, out))
    np.testing.assert_array_equal(pred.mask_logits, every[np.arange(3), pred.sel_query])
    # the final mask is the x4 bilinear upsampling of those logits, thresholded (§O10)
    np.testing.assert_array_equal(pred.masks.mean(axis=(1, 2)) > 0, pred.masks.any(axis=(1, 2)))


def test_image_index_gathers_the_right_image() -> None:
    model = _tiny()
    images, prompts = _inputs(2, 3, seed=1)
    prompts[2] = prompts[0]
    run = lambda imgs, idx: segment_jit(model, image_features_jit(model, jnp.asarray(imgs)),  # noqa: E731
                                        jnp.asarray(prompts), jnp.asarray(np.asarray(idx, np.int32)))
    a = run(images, [1, 0, 1])
    b = run(images[::-1].copy(), [0, 1, 0])  # same pairs, images stored in the other order
    np.testing.assert_array_equal(np.asarray(a.pred_logits), np.asarray(b.pred_logits))
    np.testing.assert_array_equal(np.asarray(a.pred_logits[0]), np.asarray(a.pred_logits[2]))  # same image + prompt
    assert not np.array_equal(np.asarray(a.memory[0]), np.asarray(run(images, [0, 0, 1]).memory[0]))


def test_topk_hook_forces_the_proposal_order() -> None:
    model = _tiny()
    images, prompts = _inputs(1, 2, seed=2)
    levels = image_features_jit(model, jnp.asarray(images))
    index = jnp.zeros((2,), jnp.int32)
    free = segment_debug_jit(model, levels, jnp.asarray(prompts), index)
    k = model.cfg.num_queries
    assert free.topk_indices.shape == (2, k)
    scores = np.asarray(free.enc_scores)
    np.testing.assert_array_equal(np.asarray(free.topk_indices), np.argsort(-scores, axis=1, kind="stable")[:, :k])
    forced_idx = np.asarray(free.topk_indices)[:, ::-1].copy()
    forced = segment_debug_jit(model, levels, jnp.asarray(prompts), index, jnp.asarray(forced_idx))
    np.testing.assert_array_equal(np.asarray(forced.topk_indices), forced_idx)
    nb = model.cfg.num_bg_queries
    # reversing the ranks pairs each proposal box with another content row: the boxes move with the order
    np.testing.assert_array_equal(np.asarray(forced.init_reference)[:, nb:],
                                  np.asarray(free.init_reference)[:, nb:][:, ::-1])
    np.testing.assert_array_equal(np.asarray(forced.init_reference)[:, :nb], np.asarray(free.init_reference)[:, :nb])
