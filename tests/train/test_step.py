"""The training step (architecture.md §T10, §T12, §T13): trainable mask, overfitting, frozen parameters,
sharding, schedule."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.models.segllm import DN_RESIZER
from segllm_jax.sharding import make_mesh
from segllm_jax.tokenizer import SegTokenizer
from segllm_jax.train import batching as B
from segllm_jax.train import step as S
from segllm_jax.train.config import tiny_cpu
from segllm_jax.train.loop import make_pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mixture, tokenizer_dir, vocab = prepare_tiny_mrshapes(str(tmp_path_factory.mktemp("tiny")), n_scenes=8)
    cfg = tiny_cpu(mixture, tokenizer_dir, vocab, learning_rate=3e-3)
    tokenizer = SegTokenizer.from_pretrained(tokenizer_dir)
    structure = S.abstract_structure(cfg)
    return cfg, tokenizer, structure


@pytest.fixture(scope="module")
def initial(setup):
    """The initial TrainState on the host: initialising (a jit of the whole model) costs ~20 s on CPU, so
    every test starts from this copy. It does not depend on compute_dtype or remat (float32 masters)."""
    cfg, _, structure = setup
    state, _ = S.init_state(cfg, make_mesh((1, 1, 1), jax.devices()[:1]), structure)
    return jax.device_get(state)


def _place(initial, structure, cfg, mesh):
    return jax.device_put(initial, S.state_shardings(structure, cfg, mesh))


def _batch(cfg, tokenizer, batch_size):
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
    host = next(iter(make_pipeline(cfg, tokenizer, num_epochs=1)))
    return B.make_train_batch(host["examples"], cfg, 0)


def test_trainable_mask_is_spec_5_1(setup):
    _, _, structure = setup
    keys = structure.keys
    frozen = {k for k in keys if not S.is_trainable(k)}
    for k in keys:
        expect_frozen = (k.startswith(("llm/embed_tokens/", "llm/lm_head/", "vision_tower/",
                                       "segmentator/backbone/stem/", "segmentator/backbone/res2/"))
                         or (k.startswith("segmentator/backbone/") and "/norm/" in k))
        assert (k in frozen) == expect_frozen, k
    must_train = ["llm/norm/scale", "llm/layers/0/self_attn/q_proj/kernel", "mask_enc_head/kernel",
                  "segmentator/backbone/res3/0/conv1/kernel"]
    assert all(k in keys and S.is_trainable(k) for k in must_train)
    assert any(k.startswith("mm_projector/") and S.is_trainable(k) for k in keys)
    assert any(k.startswith("segmentator_predictor/") and S.is_trainable(k) for k in keys)
    assert any(k.startswith("segmentator/decoder/") and S.is_trainable(k) for k in keys)
    assert "segmentator/backbone/res4/0/conv2/norm/running_var" in frozen


def test_overfit_one_batch_and_frozen_params_stay(setup, initial):
    cfg, tokenizer, structure = setup
    batch = _batch(cfg, tokenizer, 2)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    state = _place(initial, structure, cfg, mesh)
    before = initial
    step = jax.jit(S.make_train_step(structure, cfg))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    print("overfit losses:", [round(x, 4) for x in losses])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0]
    after = jax.device_get(state)
    for k, v in before.frozen.items():
        np.testing.assert_array_equal(after.frozen[k], v, err_msg=k)
    changed = {k for k in before.params if not np.array_equal(before.params[k], after.params[k])}
    for prefix in ("llm/layers/", "llm/norm/", "mm_projector/", "mask_enc_head/", "segmentator_predictor/"):
        assert any(k.startswith(prefix) for k in changed), prefix
    # without the HIPIE term HIPIE gets zero gradients, and AdamW (wd 0) leaves it exactly as it was
    assert not any(k.startswith("segmentator/") for k in changed)


def test_sharded_step_equals_single_device(setup, initial):
    cfg, tokenizer, structure = setup
    # Adam's update g / (sqrt(v) + eps) turns a gradient of ~1e-9 into a full +-lr step whose sign is
    # decided by rounding noise, so with eps 1e-8 two correct programs can differ by 2 lr on such
    # entries. A larger eps keeps the update a smooth function of the gradient: this test compares the
    # sharded and unsharded programs, not Adam's conditioning.
    cfg = cfg.replace(adam_eps=1e-3)
    batch = _batch(cfg, tokenizer, 4)
    results = []
    for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices()[:8])):
        mesh = make_mesh(shape, devices)
        shardings = S.state_shardings(structure, cfg, mesh)
        state = jax.device_put(initial, shardings)
        step = jax.jit(S.make_train_step(structure, cfg), out_shardings=(shardings, None))
        b = jax.device_put(batch, B.batch_shardings(batch, mesh))
        metrics = []
        for _ in range(2):
            state, m = step(state, b)
            metrics.append(jax.device_get(m))
        if shape == (2, 2, 2):  # really sharded: FSDP over embed, TP over heads, tokens over (data, fsdp)
            spec = state.params["llm/layers/0/self_attn/q_proj/kernel"].sharding.spec
            assert tuple(spec) == ("fsdp", "tensor")
            assert tuple(b.conv.input_ids.sharding.spec)[0] == ("data", "fsdp")
        results.append((metrics, jax.device_get(state.params)))
    (m1, p1), (m8, p8) = results
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    diff = max(float(np.max(np.abs(p1[k] - p8[k]))) for k in p1)
    print("sharded vs single max |param diff|:", diff, "(lr", cfg.learning_rate, ")")
    assert diff < 1e-2 * cfg.learning_rate


def test_remat_and_bf16(setup, initial):
    cfg, tokenizer, structure = setup
    batch = _batch(cfg, tokenizer, 2)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    out = {}
    for remat in ("none", "full"):
        c = dataclasses.replace(cfg, remat=remat)
        state = _place(initial, structure, c, mesh)
        _, m = jax.jit(S.make_train_step(structure, c))(state, batch)
        out[remat] = jax.device_get(m)
    np.testing.assert_allclose(out["full"]["loss"], out["none"]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out["full"]["grad_norm"], out["none"]["grad_norm"], rtol=1e-5)
    bf16 = dataclasses.replace(cfg, compute_dtype="bfloat16")
    s16 = S.abstract_structure(bf16)
    state = _place(initial, s16, bf16, mesh)
    assert all(v.dtype == np.float32 for v in state.params.values())  # float32 master weights
    state, m = jax.jit(S.make_train_step(s16, bf16))(state, batch)
    assert all(v.dtype == np.float32 for v in state.params.values())
    assert abs(float(m["loss"]) - float(out["none"]["loss"])) < 0.05 * float(out["none"]["loss"])


def test_schedule_is_hf_cosine_with_warmup(setup):
    cfg = dataclasses.replace(setup[0], steps=100, warmup_ratio=0.03, learning_rate=2e-6)
    schedule = S.make_schedule(cfg)
    warmup = math.ceil(100 * 0.03)

    def hf(s):  # transformers.get_cosine_schedule_with_warmup
        if s < warmup:
            return s / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / (100 - warmup)))

    for s in (0, 1, 2, 3, 4, 50, 99):
        np.testing.assert_allclose(float(schedule(s)), 2e-6 * hf(s), rtol=1e-5, atol=1e-12)


def test_step_with_hipie_term_trains_hipie(setup):
    """The full §T10 loss (LM + HIPIE criterion + prompt L2): ~50 s on an idle 2-core CPU (compile)."""
    from segllm_jax.train.loop import _hipie_term

    cfg, tokenizer, _ = setup
    cfg = dataclasses.replace(cfg, use_hipie_loss=True, learning_rate=1e-3)
    structure = S.abstract_structure(cfg)
    assert any(k.startswith(DN_RESIZER + "/") and S.is_trainable(k) for k in structure.keys)
    batch = _batch(cfg, tokenizer, 2)
    state, _ = S.init_state(cfg, make_mesh((1, 1, 1), jax.devices()[:1]), structure)
    before = jax.device_get(state)
    step = jax.jit(S.make_train_step(structure, cfg, _hipie_term(cfg)))
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(jax.device_get(metrics))
    print("with HIPIE:", [(round(float(m["loss"]), 3), round(float(m["loss_hipie"]), 3)) for m in losses])
    assert all(math.isfinite(float(m["loss"])) for m in losses)
    assert float(losses[-1]["loss_hipie"]) < float(losses[0]["loss_hipie"])
    after = jax.device_get(state)
    for k, v in before.frozen.items():
        np.testing.assert_array_equal(after.frozen[k], v, err_msg=k)
    for k in ("segmentator/backbone/res3/0/conv1/kernel", "segmentator/decoder/layers/0/norm1/scale"):
        assert not np.array_equal(before.params[k], after.params[k]), k


@pytest.mark.parametrize("count", [2, 8])
def test_fixed_prompt_count(setup, count):
    """``hipie_prompts``: exactly that many prompts reach HIPIE whatever the conversations' lengths (a
    subset when there are more, repeats when fewer), each a real <seg> of the batch, deterministically."""
    cfg, tokenizer, _ = setup
    cfg = dataclasses.replace(cfg, batch_size=2, use_hipie_loss=True, max_rounds=6, hipie_prompts=count)
    host = next(iter(make_pipeline(cfg, tokenizer, num_epochs=1)))
    available = sum(int(e.seg_positions.size) for e in host["examples"])
    assert 2 < available < 8  # the two cases below really are a subset and a padding
    batch = B.make_train_batch(host["examples"], cfg, 3)
    index = np.asarray(batch.hipie_index)
    assert index.shape == (count,) and batch.target_masks.shape[0] == count
    assert np.all(np.asarray(batch.seg_weight)[index] == 1) and index.max() < available
    assert len(set(index.tolist())) == min(count, available)
    np.testing.assert_array_equal(np.asarray(B.make_train_batch(host["examples"], cfg, 3).hipie_index), index)


def test_prompt_count_must_split_over_the_batch(setup):
    cfg, _, _ = setup
    with pytest.raises(Exception, match="hipie_prompts"):
        dataclasses.replace(cfg, batch_size=4, hipie_prompts=6)
