"""CLIP vision tower and projector parity with transformers / torch (through the real converter)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import save_hf, tiny_clip_vision_hf

from segllm_jax import checkpoint
from segllm_jax.config import ProjectorConfig
from segllm_jax.models.projector import MlpProjector
from segllm_jax_convert.convert import convert_checkpoint
from segllm_jax_convert.engine import convert, flat_targets, load_arrays
from segllm_jax_convert.io import open_checkpoint
from segllm_jax_convert.projector import mlp_projector_table


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    hf = tiny_clip_vision_hf()
    save_hf(hf, root / "src")
    convert_checkpoint(root / "src", root / "dst", progress=False)
    _, cfg, model = checkpoint.load_model(root / "dst")
    return hf, cfg, model


def test_selected_layer_matches_transformers(clip):
    hf, cfg, model = clip
    assert cfg.select_layer == -2 and len(model.layers) == cfg.num_layers - 1
    pixels = np.random.default_rng(0).standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.as_tensor(pixels), output_hidden_states=True).hidden_states[-2].numpy()
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    patch, cls = model.patch_features(nhwc), model.cls_feature(nhwc)
    pa, pr = rel(patch, ref[:, 1:])
    ca, cr = rel(cls, ref[:, 0])
    print(f"\nCLIP parity float32: patch max-abs {pa:.2e} rel {pr:.2e}; CLS max-abs {ca:.2e} rel {cr:.2e}")
    assert patch.shape == (2, cfg.num_patches, cfg.hidden_size) and pr <= 1e-5 and cr <= 1e-5


def test_projector_matches_torch(tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    torch.save(ref.state_dict(), tmp_path / "proj.pth")
    model = MlpProjector(ProjectorConfig(32, 64), rngs=nnx.Rngs(0))
    load_arrays(model, convert(open_checkpoint(tmp_path / "proj.pth"), mlp_projector_table(),
                               flat_targets(model), progress=False))
    x = np.random.default_rng(0).standard_normal((3, 5, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.as_tensor(x)).numpy()
    a, r = rel(model(jnp.asarray(x)), want)
    print(f"\nmlp2x_gelu parity: max-abs {a:.2e} rel {r:.2e}")
    assert r <= 1e-5
