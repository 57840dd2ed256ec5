"""The image-reading training aids (``segllm_jax.train.aids``): the attention aid against transformers' own
attention probabilities, the box aid against NumPy, the CLIP-patch map through the real preprocessors, and a
training step with both aids whose heads train, are checkpointed, and stay out of the exported model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import save_hf, tiny_llama_hf
from PIL import Image

from segllm_jax import checkpoint
from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.errors import ConfigError
from segllm_jax.preprocess import clip_image, clip_patch_cover, hipie_image, hipie_mask
from segllm_jax.sharding import make_mesh
from segllm_jax.tokenizer import SegTokenizer
from segllm_jax.train import aids, loop
from segllm_jax.train import batching as B
from segllm_jax.train import step as S
from segllm_jax.train.config import tiny_cpu
from segllm_jax_convert.convert import convert_checkpoint


def test_attention_aid_is_minus_log_of_transformers_attention_mass(tmp_path):
    hf = tiny_llama_hf()
    save_hf(hf, tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    _, cfg, llm = checkpoint.load_model(tmp_path / "dst")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (2, 20))
    mask = np.ones((2, 20), bool)
    mask[1, 16:] = False  # a right-padded row
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64)),
                 output_attentions=True).attentions[-1][:, 0].double().numpy()  # [B, T, T], head 0
    out = llm(llm.embed(jnp.asarray(ids)), token_mask=jnp.asarray(mask), return_layer_outputs=True)
    rows, cols = np.array([0, 1, 0]), np.array([12, 15, 19])
    patch_cols = np.tile(np.arange(2, 8), (3, 1))  # "image patches" at columns 2-7
    patches = np.array([[1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)  # the last: none
    loss, metrics = aids.attention_aid_loss(llm, out, jnp.asarray(mask), jnp.asarray(rows), jnp.asarray(cols),
                                            jnp.asarray(patch_cols), jnp.asarray(patches))
    mass = np.array([ref[r, c, pc[p]].sum() for r, c, pc, p in zip(rows, cols, patch_cols, patches, strict=True)])[:2]
    want = -np.log(mass).mean()
    err = abs(float(loss) - want) / abs(want)
    print(f"\nattention aid vs transformers: loss {float(loss):.6f} want {want:.6f} rel {err:.1e}")
    assert err <= 1e-5 and abs(float(metrics["attention_aid/mass"]) - mass.mean()) <= 1e-5

    def objective(llm):  # the gradient is finite with a prompt that has no target patch
        o = llm(llm.embed(jnp.asarray(ids)), token_mask=jnp.asarray(mask), return_layer_outputs=True)
        return aids.attention_aid_loss(llm, o, jnp.asarray(mask), jnp.asarray(rows), jnp.asarray(cols),
                                       jnp.asarray(patch_cols), jnp.asarray(patches))[0]

    grads = nnx.grad(objective)(llm)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    last = len(llm.layers) - 1  # the aid's gradient reaches the last layer's query projection
    assert np.abs(np.asarray(grads.layers[last].self_attn.q_proj.kernel.get_value())).max() > 0


def test_box_aid_matches_numpy():
    heads = aids.BoxAidHeads(6, rngs=nnx.Rngs(0), hidden=16)
    prompts = jax.random.normal(jax.random.key(1), (3, 8, 6))
    masks = np.zeros((3, 2, 40, 40), bool)  # (prompt, target / reference)
    for m, (y0, y1, x0, x1) in enumerate([(2, 10, 5, 25), (20, 40, 0, 8), (13, 14, 30, 39)]):
        masks[m, 0, y0:y1, x0:x1] = True
        masks[m, 1, x0:x1, y0:y1] = True
    has_aux = np.array([True, False, True])
    loss, metrics = aids.box_aid_loss(heads, prompts, jnp.asarray(masks[:, 0]), jnp.asarray(masks[:, 1]),
                                      jnp.asarray(has_aux))

    def box(m):
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 40

    p = np.asarray(prompts, np.float64)
    said_t = np.asarray(heads.target(jnp.asarray(p[:, 4:].reshape(3, -1), jnp.float32)), np.float64)
    said_r = np.asarray(heads.reference(jnp.asarray(p[:, :4].reshape(3, -1), jnp.float32)), np.float64)
    l1_t = np.mean([np.abs(said_t[m] - box(masks[m, 0])).sum() for m in range(3)])
    l1_r = np.mean([np.abs(said_r[m] - box(masks[m, 1])).sum() for m in range(3) if has_aux[m]])
    np.testing.assert_allclose(float(loss), l1_t + l1_r, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["box_aid/reference_l1"]), l1_r, rtol=1e-5)


@pytest.mark.parametrize("size", [(300, 200), (150, 260)])  # (width, height): landscape and portrait
def test_clip_patch_cover_marks_the_patches_clip_sees_the_shape_in(size):
    """A red rectangle drawn on a photo-sized image: the patches its HIPIE-frame mask covers are the CLIP
    patches that come out red from ``clip_image`` of the same image (and a shape CLIP's crop cuts off covers
    nothing)."""
    w, h = size
    pixels = np.full((h, w, 3), 255, np.uint8)
    shape = np.zeros((h, w), bool)
    shape[h // 2 - 50:h // 2 + 40, w // 2 - 30:w // 2 + 45] = True
    pixels[shape] = (255, 0, 0)
    _, hw = hipie_image(Image.fromarray(pixels), 128)
    cover = clip_patch_cover(hipie_mask(shape, 128), hw, 8)
    clip = clip_image(Image.fromarray(pixels), 64)  # 8 x 8 patches of 8 pixels
    red = (clip[..., 1] < 0).reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64).mean(-1)  # green channel low
    print(f"\n{w}x{h}: cover vs red fraction, max difference {np.abs(cover - red).max():.3f}")
    assert np.abs(cover - red).max() <= 0.25  # resampling differs at the shape's edges only
    assert (red[cover >= 0.75] >= 0.5).all() and (red[cover <= 0.25] < 0.5).all() and (cover >= 0.75).sum() >= 4
    edge = np.zeros((h, w), bool)
    if w > h:
        edge[:, :5] = True  # the left strip: outside CLIP's centred square
    else:
        edge[:5, :] = True  # the top strip
    assert clip_patch_cover(hipie_mask(edge, 128), hw, 8).max() == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mixture, tokenizer_dir, vocab = prepare_tiny_mrshapes(str(tmp_path_factory.mktemp("tiny")), n_scenes=8)
    cfg = tiny_cpu(mixture, tokenizer_dir, vocab, learning_rate=3e-3, box_aid_weight=1.0, attention_aid_weight=1.0)
    return cfg, SegTokenizer.from_pretrained(tokenizer_dir)


def test_step_with_both_aids_trains_their_heads_and_export_leaves_them_out(tiny, tmp_path):
    cfg, tokenizer = tiny
    assert not cfg.use_hipie_loss  # an LLM-only stage still gets the masks the aids need
    host = next(iter(loop.make_pipeline(cfg, tokenizer, num_epochs=1)))
    batch = B.make_train_batch(host["examples"], cfg, 0)
    assert batch.target_patches.shape == (batch.hipie_index.shape[0], cfg.model.num_image_tokens)
    assert batch.target_patches.any()
    structure = S.abstract_structure(cfg)
    heads = [k for k in structure.keys if aids.is_aid_param(k)]
    assert heads and all(S.trains(k, cfg) for k in heads)
    state, _ = S.init_state(cfg, make_mesh((1, 1, 1), jax.devices()[:1]), structure)
    before = jax.device_get(state)
    step = jax.jit(S.make_train_step(structure, cfg))
    metrics = []
    for _ in range(6):
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    print("aids:", [(round(float(m["loss_box_aid"]), 3), round(float(m["attention_aid/mass"]), 3)) for m in metrics])
    for name in ("loss_box_aid", "loss_attention_aid"):
        assert float(metrics[-1][name]) < float(metrics[0][name]), name
    after = jax.device_get(state)
    assert all(not np.array_equal(before.params[k], after.params[k]) for k in heads)

    exported = loop.export_model(state, cfg, tokenizer, tmp_path / "model")
    _, _, model = checkpoint.load_model(exported)  # strict: the folder holds exactly SegLLM's parameters
    assert not hasattr(model, aids.BOX_AID)
    shardings = S.state_shardings(structure, cfg, make_mesh((1, 1, 1), jax.devices()[:1]))
    restored = loop.restore_init_params(exported, structure, shardings)  # the next stage starts from it
    assert not any(aids.is_aid_param(k) for k in restored)
    np.testing.assert_array_equal(restored["llm/norm/scale"], after.params["llm/norm/scale"])


def test_aid_configs_are_checked(tiny):
    cfg, _ = tiny
    with pytest.raises(ConfigError, match="must be >= 0"):
        dataclasses.replace(cfg, box_aid_weight=-1.0)
    one_layer = dataclasses.replace(cfg.model, llm=dataclasses.replace(cfg.model.llm, num_layers=1))
    with pytest.raises(ConfigError, match="at least 2 layers"):
        dataclasses.replace(cfg, model=one_layer)
