"""Image side (backbone -> input_proj -> VL fusion -> 6 encoder layers) vs the PyTorch golden files.

Weights: the golden recipe saved as a .pth with every original key, read through the real
converter table (one ``subtree=`` per child module). Tolerances from the golden README:
``rtol=1e-4, atol=1e-4*absmax`` (ResNet maps ``1e-3*absmax``). Per-stage errors are printed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.image_side import HipieImageSide

from .conftest import GOLDEN_256, build_abstract, compare, convert_subtree, normalized_image_nhwc

SUBTREES = ("backbone", "input_proj", "level_embed", "fusion", "encoder")


def _forward(model: HipieImageSide, pixels, prompts, image_index):
    feats = model.encode_image(pixels)
    levels = model.prepare_levels(feats)
    enc = model.encode_prompt(levels, prompts, image_index, return_all_layers=True)
    return feats, levels, enc


@pytest.mark.golden
@pytest.mark.parametrize("golden_file", GOLDEN_256)
def test_image_side_golden(golden_file, recipe_pth) -> None:
    data = np.load(golden_file)
    seed = int(data["seed"])
    model = build_abstract(lambda: HipieImageSide(HipieConfig.hipie_r50_segllm(), rngs=nnx.Rngs(0)))
    pth = recipe_pth(seed)
    for name in SUBTREES:
        convert_subtree(pth, getattr(model, name), name + "/")

    pixels = normalized_image_nhwc(data)
    prompts = data["prompts"]
    image_index = np.zeros(prompts.shape[0], np.int32)  # every prompt of a golden file is on its one image
    feats, levels, enc = nnx.jit(_forward)(model, jnp.asarray(pixels), jnp.asarray(prompts),
                                           jnp.asarray(image_index))

    print(f"\n[{golden_file.name}] seed={seed} image side")
    compare("normalized_image", pixels.transpose(0, 3, 1, 2), data["normalized_image"])
    for name, got in zip(("res3", "res4", "res5"), feats, strict=True):
        compare(name, np.asarray(got).transpose(0, 3, 1, 2), data[name], atol_rel=1e-3)
    assert levels.spatial_shapes == tuple(map(tuple, data["spatial_shapes"].tolist()))
    assert enc.level_start_index == tuple(data["level_start_index"].tolist())
    compare("src_flatten", np.asarray(levels.src_flatten[0]), data["src_flatten"])
    compare("lvl_pos", np.asarray(levels.lvl_pos[0]), data["lvl_pos"])
    compare("vl_v", np.asarray(enc.vl_v), data["vl_v"])
    compare("vl_l", np.asarray(enc.lang_fused), data["vl_l"])
    compare("lang_fused", np.asarray(enc.lang_fused), data["lang_fused"])
    for i, got in enumerate(enc.memory_layers):
        compare(f"memory[{i}]", np.asarray(got), data["memory"][i])
    np.testing.assert_array_equal(np.asarray(enc.memory), np.asarray(enc.memory_layers[-1]))
    assert not np.asarray(enc.mask_flatten).any()
    np.testing.assert_array_equal(np.asarray(enc.valid_ratios), 1.0)
