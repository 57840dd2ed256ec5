"""Logical-axis sharding: the 7B shapes get valid specs on a 2x2x2 mesh; sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from segllm_jax import sharding
from segllm_jax.config import LlamaConfig, ProjectorConfig, VisionConfig
from segllm_jax.errors import ConfigError
from segllm_jax.models.clip_vision import ClipVision
from segllm_jax.models.llama import Llama
from segllm_jax.models.projector import MlpProjector

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices; see tests/conftest.py")


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _check_specs(module, mesh):
    state = nnx.state(module, nnx.Param)
    shardings = sharding.state_shardings(state, mesh)
    total = per_device = 0
    for (path, var), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings), strict=True):
        shape = var.get_value().shape
        assert isinstance(s, NamedSharding), path
        spec = s.spec
        axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        assert len(axes) == len(set(axes)), f"{path}: mesh axis used twice in {spec}"
        shard = s.shard_shape(shape)  # raises if a dimension is not evenly divisible
        total += int(np.prod(shape))
        per_device += int(np.prod(shard))
    return total, per_device


def test_7b_parameters_get_valid_specs(mesh):
    llm_cfg, vis_cfg = LlamaConfig.llava_7b(), VisionConfig.clip_vit_l14()
    llm = nnx.eval_shape(lambda: Llama(llm_cfg, rngs=nnx.Rngs(0)))
    vision = nnx.eval_shape(lambda: ClipVision(vis_cfg, rngs=nnx.Rngs(0)))
    proj = nnx.eval_shape(lambda: MlpProjector(ProjectorConfig.for_models(vis_cfg, llm_cfg), rngs=nnx.Rngs(0)))
    llm_total, llm_dev = _check_specs(llm, mesh)
    assert 6.7e9 < llm_total < 6.8e9  # LLaMA-2-7B with 32011 tokens
    # fsdp x tensor = 4-way; the odd vocabulary (32011) leaves the vocab dim of embed/lm_head 2-way only
    assert llm_dev <= llm_total / 3.8
    vis_total, vis_dev = _check_specs(vision, mesh)
    assert vis_dev < vis_total / 3
    _check_specs(proj, mesh)


def test_unknown_logical_axis_is_an_error(mesh):
    with pytest.raises(ConfigError, match="no sharding rule"):
        sharding.logical_to_spec(("embed", "not_an_axis"), (8, 8), mesh)


def test_tiny_sharded_forward_equals_unsharded(mesh):
    cfg = LlamaConfig.tiny(vocab_size=64)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 12)))
    want = model(model.embed(ids)).logits

    sharded = Llama(cfg, rngs=nnx.Rngs(0))
    sharding.shard_module(sharded, mesh)
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

    @nnx.jit
    def forward(m, ids):
        return m(m.embed(ids)).logits

    batch = jax.device_put(ids, NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    got = forward(sharded, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
