"""``proposal_grounding_loss``, a training aid of the learning recipe: a softmax over every encoder token
of a prompt whose positives are the tokens covered by the prompt's target, checked against a float64
NumPy reference written cell by cell."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from segllm_jax.train.hipie_loss import proposal_grounding_loss

SHAPES = ((4, 4), (2, 2), (1, 1))  # level grids of an 8 x 8 mask: strides 2, 4, 8


def _reference(logits, boxes, masks):
    losses = []
    for b in range(masks.shape[0]):
        cover, s = [], 0
        for hl, wl in SHAPES:
            sy, sx = masks.shape[1] // hl, masks.shape[2] // wl
            for y in range(hl):
                for x in range(wl):
                    cell = masks[b, y * sy:(y + 1) * sy, x * sx:(x + 1) * sx]
                    valid = not np.all(boxes[b, s] == 1.0)
                    cover.append(float(cell.mean()) if valid else 0.0)
                    s += 1
        cover = np.asarray(cover)
        valid = ~np.all(boxes[b] == 1.0, axis=-1)
        positive = (cover > 0) & (cover >= 0.5 * cover.max())
        if not positive.any():
            continue
        z = logits[b].astype(np.float64)
        lse = np.log(np.exp(z[valid]).sum())
        losses.append(lse - np.log(np.exp(z[positive]).sum()))
    return np.mean(losses)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in SHAPES)
    logits = rng.normal(size=(4, s)).astype(np.float32) * 3
    boxes = rng.random((4, s, 4)).astype(np.float32)
    masks = np.zeros((4, 8, 8), bool)
    masks[0, 1:4, 2:7] = True
    masks[1, 5:8, 0:2] = True
    masks[2, 3, 3] = True  # one pixel: positives are the tokens that cover it best
    return logits, boxes, masks  # prompt 3: empty target


def test_matches_numpy_reference():
    logits, boxes, masks = _inputs()
    boxes[1, [0, 5, 17]] = 1.0  # invalid proposals drop out of both sums
    got = float(proposal_grounding_loss(jnp.asarray(logits), jnp.asarray(boxes), SHAPES, jnp.asarray(masks)))
    want = _reference(logits, boxes, masks)
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_low_when_the_target_tokens_win_and_high_when_others_do():
    logits, boxes, masks = _inputs(1)
    cover = np.concatenate([masks.reshape(4, h, 8 // h, w, 8 // w).mean((2, 4)).reshape(4, -1) for h, w in SHAPES], 1)
    on_target = (cover > 0) & (cover >= 0.5 * cover.max(1, keepdims=True))
    right = np.where(on_target, 30.0, 0.0).astype(np.float32)
    wrong = np.where(cover > 0, 0.0, 30.0).astype(np.float32)
    f = lambda z: float(proposal_grounding_loss(jnp.asarray(z), jnp.asarray(boxes), SHAPES, jnp.asarray(masks)))
    assert f(right) < 1e-6
    assert f(wrong) > 20


def test_a_prompt_with_an_empty_target_adds_nothing():
    logits, boxes, masks = _inputs(2)
    f = lambda z, m: float(proposal_grounding_loss(jnp.asarray(z), jnp.asarray(boxes[:len(m)]), SHAPES, jnp.asarray(m)))
    assert f(logits[:3], masks[:3]) == pytest.approx(f(logits, masks), rel=1e-6)


def test_mask_must_tile_every_level():
    logits, boxes, masks = _inputs()
    with pytest.raises(ValueError, match="not a multiple of the level grid"):
        proposal_grounding_loss(jnp.asarray(logits), jnp.asarray(boxes), ((3, 3),) + SHAPES[1:], jnp.asarray(masks))
