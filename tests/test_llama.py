"""LLaMA parity with transformers (through the real converter) and KV-cache exactness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import save_hf, tiny_llama_hf

from segllm_jax import checkpoint
from segllm_jax.config import LlamaConfig
from segllm_jax.models.llama import KVCache, Llama
from segllm_jax_convert.convert import convert_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny HF LLaMA saved as sharded safetensors, converted with the real converter."""
    root = tmp_path_factory.mktemp("llama")
    hf = tiny_llama_hf()
    save_hf(hf, root / "src", shard_size="100KB")
    assert (root / "src" / "model.safetensors.index.json").exists()
    convert_checkpoint(root / "src", root / "dst", progress=False)
    _, cfg, model = checkpoint.load_model(root / "dst")
    return hf, cfg, model


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()


def test_logits_and_hidden_match_transformers(converted):
    hf, cfg, model = converted
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), output_hidden_states=True)
    out = model(model.embed(jnp.asarray(ids)))
    a, r = rel_err(out.logits, ref.logits)
    ha, hr = rel_err(out.hidden, ref.hidden_states[-1])
    print(f"\nLLaMA parity float32: logits max-abs {a:.2e} rel {r:.2e}; final hidden max-abs {ha:.2e} rel {hr:.2e}")
    assert r <= 1e-5 and hr <= 1e-5


def test_padding_mask_matches_transformers(converted):
    """A right-padded row gives the same logits on its real tokens as transformers with attention_mask."""
    hf, cfg, model = converted
    ids = np.random.default_rng(2).integers(1, cfg.vocab_size, (2, 12))
    mask = np.ones((2, 12), bool)
    mask[1, 8:] = False
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64))).logits.numpy()
    out = model(model.embed(jnp.asarray(ids)), token_mask=jnp.asarray(mask))
    _, r = rel_err(np.asarray(out.logits)[mask], ref[mask])
    assert r <= 1e-5


def test_prefill_then_appends_equal_one_forward():
    cfg = LlamaConfig.tiny(vocab_size=64)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 20)))
    full = model(model.embed(ids))
    cache = KVCache.empty(cfg, 2, 32)
    parts, hidden = [(0, 9), (9, 10), (10, 20)], []  # prefill, a one-token append, a multi-token append
    for s, e in parts:
        out = model(model.embed(ids[:, s:e]), cache=cache)
        cache = out.cache
        hidden.append(out.hidden)
    np.testing.assert_allclose(np.concatenate(hidden, 1), full.hidden, rtol=1e-5, atol=1e-5)
    assert int(cache.end) == 20 and bool(cache.valid[:, :20].all()) and not bool(cache.valid[:, 20:].any())


def test_two_appends_equal_one_append():
    cfg = LlamaConfig.tiny(vocab_size=64)
    model = Llama(cfg, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (1, 16)))
    prefix = model(model.embed(ids[:, :6]), cache=KVCache.empty(cfg, 1, 16)).cache
    one = model(model.embed(ids[:, 6:]), cache=prefix)
    a = model(model.embed(ids[:, 6:11]), cache=prefix)
    b = model(model.embed(ids[:, 11:]), cache=a.cache)
    np.testing.assert_allclose(np.concatenate([a.logits, b.logits], 1), one.logits, rtol=1e-5, atol=1e-4)


def test_bfloat16_compute_stays_close():
    cfg32 = LlamaConfig.tiny(vocab_size=64)
    cfg16 = LlamaConfig.tiny(vocab_size=64, param_dtype="bfloat16", dtype="bfloat16")
    m32, m16 = Llama(cfg32, rngs=nnx.Rngs(5)), Llama(cfg16, rngs=nnx.Rngs(5))
    nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 64, (1, 10)))
    l32, l16 = m32(m32.embed(ids)).logits, m16(m16.embed(ids)).logits
    assert m16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    p32, p16 = jnp.exp(l32 - l32.max(-1, keepdims=True)), jnp.exp(l16 - l16.max(-1, keepdims=True))
    p32, p16 = p32 / p32.sum(-1, keepdims=True), p16 / p16.sum(-1, keepdims=True)
    kl = float((p32 * (jnp.log(p32) - jnp.log(p16))).sum(-1).mean())
    assert kl < 0.015
