"""``target_ranking_loss``, the learning recipe's training aid: a softmax over a prompt's queries whose
positives are the queries matched to the prompt's target (not its reference), checked against NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from segllm_jax.train.hipie_loss import target_ranking_loss
from segllm_jax.train.matcher import PaddedIndices


def _reference(logits, src, tgt, valid, target_slot):
    layers, batch, queries, tokens = logits.shape
    score = logits[..., tokens // 2:].mean(-1).astype(np.float64)
    losses = []
    for layer in range(layers):
        for b in range(batch):
            pos = {int(q) for q, g, v in zip(src[layer, b], tgt[layer, b], valid[layer, b], strict=True)
                   if v and g == target_slot[b]}
            if pos:
                s = score[layer, b]
                lse = np.log(np.exp(s - s.max()).sum()) + s.max()
                lse_pos = np.log(sum(np.exp(s[q] - s.max()) for q in pos)) + s.max()
                losses.append(lse - lse_pos)
    return np.mean(losses)


def test_matches_numpy_and_ignores_the_reference_slot():
    rng = np.random.default_rng(0)
    layers, batch, queries, tokens, k = 2, 3, 6, 8, 4
    logits = rng.normal(size=(layers, batch, queries, tokens)).astype(np.float32)
    src = rng.integers(0, queries, size=(layers, batch, k)).astype(np.int32)
    tgt = rng.integers(0, 2, size=(layers, batch, k)).astype(np.int32)
    valid = rng.random((layers, batch, k)) < 0.7
    valid[:, 2] = False  # a prompt without matches adds nothing
    # prompts 0 and 2 have a reference (target tokens in GT slot 1), prompt 1 only a target (slot 0)
    pmap = np.zeros((batch, 2, tokens), np.float32)
    pmap[[0, 2], 0, : tokens // 2] = 1
    pmap[[0, 2], 1, tokens // 2:] = 1
    pmap[1, 0, tokens // 2:] = 1
    indices = PaddedIndices(jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(valid))
    got = target_ranking_loss(jnp.asarray(logits), indices, jnp.asarray(pmap))
    want = _reference(logits, src, tgt, valid, target_slot=np.array([1, 0, 1]))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_is_small_when_the_target_query_wins():
    logits = np.zeros((1, 1, 4, 8), np.float32)
    logits[0, 0, 2, 4:] = 20.0  # query 2 scores the target tokens far above the others
    pmap = np.zeros((1, 2, 8), np.float32)
    pmap[0, 0, 4:] = 1
    index = PaddedIndices(jnp.asarray([[[2, 0]]]), jnp.asarray([[[0, 0]]]), jnp.asarray([[[True, False]]]))
    assert float(target_ranking_loss(jnp.asarray(logits), index, jnp.asarray(pmap))) < 1e-6
    wrong = PaddedIndices(jnp.asarray([[[1, 0]]]), index.tgt, index.valid)
    assert float(target_ranking_loss(jnp.asarray(logits), wrong, jnp.asarray(pmap))) > 19
