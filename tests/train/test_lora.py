"""LoRA / QLoRA training through qwix (issue 17): only adapters (and ``lora.train``) change, the loss falls, the
frozen base (float32, bfloat16, int8 / nf4) stays bit-identical, merging equals the adapter forward, bad configs
give one clear error."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
import pytest

from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.errors import ConfigError
from segllm_jax.sharding import make_mesh
from segllm_jax.tokenizer import SegTokenizer
from segllm_jax.train import batching as B
from segllm_jax.train import lora as L
from segllm_jax.train import step as S
from segllm_jax.train.config import LoraConfig, tiny_cpu
from segllm_jax.train.loop import make_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mixture, tokenizer_dir, vocab = prepare_tiny_mrshapes(str(tmp_path_factory.mktemp("tiny")), n_scenes=8)
    return mixture, tokenizer_dir, vocab, SegTokenizer.from_pretrained(tokenizer_dir)


def _cfg(tiny, **kw):
    mixture, tokenizer_dir, vocab, _ = tiny
    kw = {"learning_rate": 1e-2, "lora": LoraConfig(rank=4, alpha=8.0), **kw}
    return tiny_cpu(mixture, tokenizer_dir, vocab, **kw)


def _batch(cfg, tokenizer):
    host = next(iter(make_pipeline(cfg, tokenizer, num_epochs=1)))
    return B.make_train_batch(host["examples"], cfg, 0)


def _run(cfg, tokenizer, steps):
    mesh = make_mesh(cfg.mesh_shape, jax.devices()[:math.prod(cfg.mesh_shape)])
    structure = S.abstract_structure(cfg)
    state, _ = S.init_state(cfg, mesh, structure)
    before = jax.device_get(state)
    step = jax.jit(S.make_train_step(structure, cfg), out_shardings=(S.state_shardings(structure, cfg, mesh), None))
    batch = _batch(cfg, tokenizer)
    batch = jax.device_put(batch, B.batch_shardings(batch, mesh))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return structure, before, jax.device_get(state), losses


@pytest.fixture(scope="module")
def trained(tiny):
    """``qtype -> (cfg, structure, state before, state after, losses)`` of 6 steps on one batch, each run once.
    The nf4 run is also sharded (FSDP 2 x TP 2), rematerialised and uses adapter dropout."""
    runs = {}

    def get(qtype):
        if qtype not in runs:
            extra = dict(mesh_shape=(1, 2, 2), remat="full", lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1)) \
                if qtype == "nf4" else {}
            cfg = _cfg(tiny, base_weights_qtype=qtype, **extra)
            runs[qtype] = (cfg, *_run(cfg, tiny[3], 6))
        return runs[qtype]

    return get


@pytest.mark.parametrize("qtype", ["none", "bf16", "nf4"])
def test_only_adapters_train_and_loss_falls(trained, qtype):
    cfg, structure, before, after, losses = trained(qtype)
    print(f"lora ({qtype} base) losses:", [round(x, 4) for x in losses])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1
    adapters = [k for k in structure.keys if L.is_adapter(k)]
    assert len(adapters) == 2 * 7 * cfg.model.llm.num_layers
    assert set(after.params) == set(adapters) | {k for k in structure.keys
                                                 if k.startswith(("segmentator_predictor/", "mask_enc_head/"))}
    assert any(not np.array_equal(after.params[k], before.params[k]) for k in adapters if k.endswith("lora_b"))
    for k, v in before.frozen.items():  # bit-identical frozen base, as stored
        assert v.dtype == after.frozen[k].dtype and np.array_equal(v, after.frozen[k]), k
    # adapters, trained heads and Adam moments stay float32 whatever the base
    assert {x.dtype for x in jax.tree.leaves((after.params, after.opt_state)) if x.ndim} == {np.dtype("float32")}
    q = "llm/layers/0/self_attn/q_proj/"
    if qtype == "bf16":  # every frozen float leaf in bfloat16
        assert {v.dtype for v in after.frozen.values()} == {np.dtype(jax.numpy.bfloat16)}
    if qtype == "nf4":  # qwix's QArray: nf4 codes, one float32 scale per 64 inputs of each output column
        codes, scale = after.frozen[q + "kernel/array/qvalue"], after.frozen[q + "kernel/array/scale"]
        assert codes.dtype == jax.numpy.uint4 and scale.shape == (codes.shape[0] // 64, codes.shape[1])
        assert q + "kernel" not in structure.keys
        placed = S.state_shardings(structure, cfg, make_mesh(cfg.mesh_shape, jax.devices()[:4])).params
        assert tuple(placed[q + "kernel_lora_a"].spec) == ("fsdp", None)  # adapters shard like their kernel
        assert tuple(placed[q + "kernel_lora_b"].spec) == (None, "tensor")
    # Adam moments exist only for trainable leaves
    n_opt = sum(x.size for x in jax.tree.leaves(after.opt_state))
    assert n_opt <= 2 * sum(v.size for v in after.params.values()) + 16


def test_merge_equals_adapter_forward(tiny, trained):
    cfg, structure, _, after, _ = trained("none")
    values = {**after.params, **after.frozen}
    plain_cfg = dataclasses.replace(cfg, lora=None)
    plain = S.ModelStructure(S.build_training_model(plain_cfg))
    merged = L.merge(values, cfg.lora.scale, cfg.base_weights_qtype)
    assert set(merged) == set(plain.keys)
    batch = _batch(cfg, tiny[3])
    from segllm_jax.batch import forward

    out_lora, _ = forward(structure.merge(values), batch.conv)
    out_plain, _ = forward(plain.merge(merged), batch.conv)
    a, b = np.asarray(out_lora.logits), np.asarray(out_plain.logits)
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel <= 1e-5, rel


def test_bad_configs_give_one_clear_error(tiny):
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    for bad in ("fp3", "int4", "float16"):  # int4 is an inference qtype (segllm_jax.quantize.QTYPE_TABLE) only
        with pytest.raises(ConfigError, match=f"base_weights_qtype='{bad}'.*none, bf16, int8, nf4"):
            _cfg(tiny, base_weights_qtype=bad)
    with pytest.raises(ConfigError, match="set lora="):
        _cfg(tiny, lora=None, base_weights_qtype="nf4")
    cfg = _cfg(tiny, lora=LoraConfig(targets=(r"llm/layers/\d+/self_attn/qkv_fused",)))
    with pytest.raises(ConfigError, match=r"qkv_fused.*matches no Linear.*llm/layers/0/"):
        S.abstract_structure(cfg)


def test_resume_merge_lora_and_load(tiny, tmp_path, monkeypatch):
    """A QLoRA run from a base folder, stopped after a checkpoint and resumed, matches a straight
    run; its checkpoints hold no frozen base; ``merge-lora`` rebuilds exactly the exported merged model."""
    from segllm_jax import checkpoint as C
    from segllm_jax.apps.cli import main
    from segllm_jax.train import loop

    mixture, tokenizer_dir, vocab, tokenizer = tiny
    plain = tiny_cpu(mixture, tokenizer_dir, vocab)
    base_values = S.ModelStructure(S.build_training_model(plain)).values(S.build_training_model(plain))
    C.save(tmp_path / "base", "segllm", plain.model, {k: np.asarray(v) for k, v in base_values.items()})
    tokenizer.save(tmp_path / "base")
    cfg = _cfg(tiny, base_weights_qtype="int8", init_checkpoint=str(tmp_path / "base"), steps=4,
               checkpoint_every=2, async_checkpointing=False, learning_rate=3e-3)
    straight = loop.train(cfg, tmp_path / "straight")
    real = B.make_train_batch

    def dies_at_step_2(examples, c, step, **kwargs):  # the run is "killed" after its step-2 checkpoint
        if step == 2:
            raise KeyboardInterrupt
        return real(examples, c, step, **kwargs)

    monkeypatch.setattr(loop.batching, "make_train_batch", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, tmp_path / "killed")
    monkeypatch.setattr(loop.batching, "make_train_batch", real)
    resumed = loop.train(cfg, tmp_path / "killed")
    assert [r["step"] for r in resumed] == [2, 3]
    drop = lambda r: {k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")}  # noqa: E731
    assert [drop(r) for r in straight[2:]] == [drop(r) for r in resumed]
    ckpt_files = [p.name for p in (tmp_path / "killed/checkpoints/4/state").rglob("*")]
    assert not any("frozen" in n for n in ckpt_files)
    a = C.flat_arrays(C.load(tmp_path / "straight/model").model)
    b = C.flat_arrays(C.load(tmp_path / "killed/model").model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["merge-lora", "--checkpoint", str(tmp_path / "killed"), "--out", str(tmp_path / "merged")]) == 0
    merged = C.load(tmp_path / "merged")
    assert merged.tokenizer is not None
    m = C.flat_arrays(merged.model)
    assert set(m) == set(a)
    for k in a:
        np.testing.assert_allclose(m[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert main(["merge-lora", "--checkpoint", str(tmp_path / "killed"), "--out", str(tmp_path / "merged")]) != 0


def test_merge_keeps_the_dn_label_encoder_for_training(tiny, tmp_path):
    """``merge-lora`` of a run whose ``lora.train`` trains HIPIE (its DN label encoder included, a training-only
    module): the merged folder keeps the trained encoder in ``training_params/`` as ``export_model`` does, and a
    run that did not train it keeps the base's."""
    import orbax.checkpoint as ocp

    from segllm_jax import checkpoint as C
    from segllm_jax.models.segllm import DN_RESIZER

    mixture, tokenizer_dir, vocab, tokenizer = tiny
    plain = tiny_cpu(mixture, tokenizer_dir, vocab, use_hipie_loss=True)
    values = {k: np.asarray(v) for k, v in S.ModelStructure(S.build_training_model(plain)).values(
        S.build_training_model(plain)).items()}
    dn = {k: values.pop(k) for k in list(values) if k.startswith(DN_RESIZER + "/")}
    assert dn
    C.save(tmp_path / "base", "segllm", plain.model, values, training_arrays=dn)
    tokenizer.save(tmp_path / "base")

    def training_params(folder):
        with ocp.PyTreeCheckpointer() as ckptr:
            return C.flatten_tree(ckptr.restore((tmp_path / folder / C.TRAINING_PARAMS).absolute()))

    for name, train in (("with_dn", (r"^segmentator_dn_resizer/",)), ("without_dn", (r"^mask_enc_head/",))):
        cfg = plain.replace(lora=LoraConfig(rank=4, alpha=8.0, train=train), init_checkpoint=str(tmp_path / "base"))
        keys = S.abstract_structure(cfg).keys
        trained = {k: np.full(s.shape, 0.5, np.float32) for k, s in S.abstract_structure(cfg).abstract().items()
                   if L.is_adapter(k) or any(re.search(p, k) for p in train)}
        assert any(k.startswith(DN_RESIZER) for k in trained) == (name == "with_dn") and len(keys) > len(trained)
        L.write_adapters(tmp_path / name / "adapters", trained, cfg)
        L.merge_to_folder(tmp_path / name, tmp_path / f"{name}_merged")
        assert C.load(tmp_path / f"{name}_merged").tokenizer is not None
        got, want = training_params(f"{name}_merged"), {**dn, **{k: v for k, v in trained.items() if k in dn}}
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
