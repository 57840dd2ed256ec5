"""Training from a converted checkpoint: HIPIE's DN label encoder (``detr.resizer``) survives conversion into
``training_params/``, and ``init_checkpoint`` is restored straight into the train state's shardings (8 CPU devices)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from segllm.conftest import golden_segllm_dir

from segllm_jax import checkpoint
from segllm_jax.data.pipeline import MixtureConfig
from segllm_jax.models.segllm import DN_RESIZER
from segllm_jax.train import loop
from segllm_jax.train import step as S
from segllm_jax.train.config import TrainConfig
from segllm_jax_convert.convert import convert_checkpoint, convert_training_init

pytestmark = pytest.mark.skipif(not (golden_segllm_dir() / "state_dict_keys.json").exists(),
                                reason="the release key list comes from ../shared/golden/segllm")

DN = DN_RESIZER + "/"


def resizer_tensors(prefix: str, seed: int = 7) -> dict[str, np.ndarray]:
    """``detr.resizer`` with the real key names, tiny shapes (Linear text_dim 48 -> d_model 32, LayerNorm 32)."""
    rng = np.random.default_rng(seed)
    shapes = {"fc.weight": (32, 48), "fc.bias": (32,), "layer_norm.weight": (32,), "layer_norm.bias": (32,)}
    return {f"{prefix}detr.resizer.{k}": rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}


def expected_dn(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    r = f"{prefix}detr.resizer."
    return {DN + "fc/kernel": tensors[r + "fc.weight"].T, DN + "fc/bias": tensors[r + "fc.bias"],
            DN + "layer_norm/scale": tensors[r + "layer_norm.weight"],
            DN + "layer_norm/bias": tensors[r + "layer_norm.bias"]}


def add_shard(release: Path, tensors: dict[str, np.ndarray]) -> None:
    """One more safetensors shard in a release folder (and its index)."""
    save_file(tensors, release / "model-dn.safetensors")
    index_path = release / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: "model-dn.safetensors" for k in tensors})
    index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{"with": (folder, DN arrays), "without": (folder, None)}: tiny releases converted by the real converter."""
    from segllm.tiny_release import write_tiny_release

    root = tmp_path_factory.mktemp("init_ckpt")
    resizer = resizer_tensors("model.segmentator.hipie.")
    add_shard(write_tiny_release(root / "release_with"), resizer)
    write_tiny_release(root / "release_without")
    return {"with": (convert_checkpoint(root / "release_with", root / "with", progress=False),
                     expected_dn(resizer, "model.segmentator.hipie.")),
            "without": (convert_checkpoint(root / "release_without", root / "without", progress=False), None)}


def train_config(init: Path, mesh_shape=(2, 2, 2)) -> TrainConfig:
    from segllm.tiny_release import tiny_config

    return TrainConfig(model=tiny_config(), data=MixtureConfig((), (), "", ""), tokenizer_dir="",
                       init_checkpoint=str(init), compute_dtype="float32", remat="none", mesh_shape=mesh_shape,
                       use_hipie_loss=True)


def stored_training_params(folder: Path, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {k: jax.ShapeDtypeStruct(v.shape, np.float32, sharding=device) for k, v in like.items()}
    return jax.device_get(checkpoint.restore_sharded(folder, targets, checkpoint.TRAINING_PARAMS))


def test_release_conversion_keeps_dn_resizer_apart(converted):
    folder, dn = converted["with"]
    for k, v in stored_training_params(folder, dn).items():
        np.testing.assert_array_equal(v, dn[k], err_msg=k)
    kind, _, model = checkpoint.load_model(folder)  # inference loading is strict and does not see it
    assert kind == "segllm" and not any(k.startswith(DN) for k in checkpoint.flat_arrays(model))
    assert not (converted["without"][0] / checkpoint.TRAINING_PARAMS).exists()


def test_mis_shaped_dn_resizer_is_refused():
    from segllm.tiny_release import tiny_config

    from segllm_jax.errors import ConversionError
    from segllm_jax_convert.io import TensorInfo, TensorSource
    from segllm_jax_convert.segllm import dn_resizer_arrays

    prefix = "model.segmentator.hipie."
    tensors = {**resizer_tensors(prefix), prefix + "detr.resizer.fc.bias": np.zeros(31, np.float32),
               "model.norm.weight": np.ones(64, np.float32)}  # other keys belong to the main tables
    where = Path("in-memory")
    source = TensorSource({k: TensorInfo(v.shape, v.dtype, where) for k, v in tensors.items()}, {where: tensors.get})
    with pytest.raises(ConversionError, match=r"detr\.resizer\.fc\.bias: shape \(31,\)"):
        dn_resizer_arrays(source, tiny_config(), prefix, progress=False)


def test_training_init_conversion_keeps_dn_resizer(tmp_path):
    from segllm.tiny_release import write_tiny_training_sources

    llava, clip, hipie, _ = write_tiny_training_sources(tmp_path / "sources")
    parts = torch.load(hipie, weights_only=True)
    resizer = resizer_tensors("")
    torch.save({**parts, **{k: torch.from_numpy(v) for k, v in resizer.items()}}, hipie)
    folder = convert_training_init(llava, clip, hipie, tmp_path / "init", progress=False)
    dn = expected_dn(resizer, "")
    for k, v in stored_training_params(folder, dn).items():
        np.testing.assert_array_equal(v, dn[k], err_msg=k)


def test_init_checkpoint_restores_into_shardings(converted):
    folder, dn = converted["with"]
    cfg = train_config(folder)
    structure = S.abstract_structure(cfg)
    mesh = loop.mesh_for(cfg)
    assert mesh.devices.size == 8
    shardings = S.state_shardings(structure, cfg, mesh)
    values = loop.restore_init_params(folder, structure, shardings)
    assert set(values) == set(structure.keys)
    where = {**shardings.params, **shardings.frozen}
    for k, v in values.items():
        assert v.sharding == where[k] and v.dtype == np.float32, k
    q = values["llm/layers/0/self_attn/q_proj/kernel"]
    assert tuple(q.sharding.spec) == ("fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0] // 2, q.shape[1] // 2)}  # really split
    stored = checkpoint.flat_arrays(checkpoint.load_model(folder)[2])
    host = jax.device_get(values)
    for k, v in host.items():
        np.testing.assert_array_equal(v, dn[k] if k.startswith(DN) else stored[k], err_msg=k)

    # the trainer's state starts from exactly these weights, in the same shardings
    state, _ = S.init_state(cfg, mesh, structure, values)
    for k in (DN + "fc/kernel", "llm/layers/0/self_attn/q_proj/kernel", "segmentator/level_embed/embedding"):
        np.testing.assert_array_equal(np.asarray(state.params[k]), host[k], err_msg=k)
        assert state.params[k].sharding == where[k]
    np.testing.assert_array_equal(np.asarray(state.frozen["llm/embed_tokens/embedding"]),
                                  host["llm/embed_tokens/embedding"])


def test_init_checkpoint_without_dn_resizer_warns(converted, caplog):
    folder, _ = converted["without"]
    cfg = train_config(folder, mesh_shape=(1, 1, 1))
    structure = S.abstract_structure(cfg)
    shardings = S.state_shardings(structure, cfg, loop.mesh_for(cfg))
    with caplog.at_level(logging.WARNING, logger=loop.__name__):
        values = loop.restore_init_params(folder, structure, shardings)
    assert "no HIPIE DN label encoder" in caplog.text and "fresh init" in caplog.text
    assert set(values) == {k for k in structure.keys if not k.startswith(DN)}  # init_state keeps them fresh
