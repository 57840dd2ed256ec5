"""MSDeformAttn module vs Hugging Face ``DeformableDetrMultiscaleDeformableAttention`` (architecture.md §H15).

Same random weights in both; the HF module is pure PyTorch on CPU (``USE_HUB_KERNELS=0``). Its
``attention_mask`` is True for *valid* tokens, HIPIE's ``padding_mask`` True for *padding*.
"""

from __future__ import annotations

import os

os.environ.setdefault("USE_HUB_KERNELS", "0")

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segllm_jax.models.hipie.deformable_attention import MSDeformAttn

torch = pytest.importorskip("torch")
hf = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")

D_MODEL, HEADS, LEVELS, POINTS = 256, 8, 4, 4
SHAPES = ((12, 10), (6, 5), (3, 3), (2, 1))  # non-square, odd sizes: catches H/W swaps


def _hf_module(rng: np.random.Generator):
    cfg = hf.DeformableDetrConfig(d_model=D_MODEL, num_feature_levels=LEVELS, encoder_attention_heads=HEADS,
                                  encoder_n_points=POINTS)
    mod = hf.DeformableDetrMultiscaleDeformableAttention(cfg, num_heads=HEADS, n_points=POINTS).eval()
    sd = {}
    for name, p in mod.state_dict().items():
        scale = 1.0 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.02
        if name == "sampling_offsets.weight":
            scale *= 4.0  # offsets of a few pixels: samples fall between pixels and outside the map
        sd[name] = torch.from_numpy(rng.normal(0, scale, size=tuple(p.shape)).astype(np.float32))
    mod.load_state_dict(sd)
    return mod, {k: v.numpy() for k, v in sd.items()}


def _jax_module(sd: dict[str, np.ndarray]) -> MSDeformAttn:
    mod = MSDeformAttn(D_MODEL, HEADS, LEVELS, POINTS, rngs=nnx.Rngs(0), impl="xla")
    for name in ("value_proj", "sampling_offsets", "attention_weights", "output_proj"):
        lin = getattr(mod, name)
        lin.kernel.set_value(jnp.asarray(sd[f"{name}.weight"].T))
        lin.bias.set_value(jnp.asarray(sd[f"{name}.bias"]))
    return mod


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("with_padding", [False, True])
def test_msdeformattn_matches_transformers(ref_dim: int, with_padding: bool) -> None:
    rng = np.random.default_rng(1234 + ref_dim + 10 * with_padding)
    hf_mod, sd = _hf_module(rng)
    mod = _jax_module(sd)
    b, q = 2, 7
    s = sum(h * w for h, w in SHAPES)
    starts = np.cumsum([0] + [h * w for h, w in SHAPES])[:-1]
    query = rng.normal(size=(b, q, D_MODEL)).astype(np.float32)
    value_in = rng.normal(size=(b, s, D_MODEL)).astype(np.float32)
    if ref_dim == 2:
        ref = rng.uniform(-0.05, 1.05, size=(b, q, LEVELS, 2)).astype(np.float32)
    else:
        ref = np.concatenate([rng.uniform(0.0, 1.0, size=(b, q, LEVELS, 2)),
                              rng.uniform(0.05, 0.8, size=(b, q, LEVELS, 2))], -1).astype(np.float32)
    pad = rng.uniform(size=(b, s)) < 0.3 if with_padding else None

    with torch.no_grad():
        want, _ = hf_mod(
            torch.from_numpy(query),
            attention_mask=None if pad is None else torch.from_numpy(~pad),  # HF: True = valid
            encoder_hidden_states=torch.from_numpy(value_in),
            reference_points=torch.from_numpy(ref),
            spatial_shapes=torch.tensor(SHAPES, dtype=torch.long),
            spatial_shapes_list=list(SHAPES),
            level_start_index=torch.from_numpy(starts.astype(np.int64)),
        )
    want = want.numpy()
    got = np.asarray(mod(jnp.asarray(query), jnp.asarray(ref), jnp.asarray(value_in), SHAPES, tuple(starts),
                         None if pad is None else jnp.asarray(pad)))
    err = np.abs(got - want)
    absmax = float(np.abs(want).max())
    print(f"\nMSDeformAttn ref_dim={ref_dim} padding={with_padding}: max|d|={err.max():.3e} "
          f"max|d|/absmax={err.max() / absmax:.3e} (absmax {absmax:.3e})")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * absmax)


def test_padding_rows_do_not_contribute() -> None:
    """Changing the value rows of padded tokens must not change the output."""
    rng = np.random.default_rng(7)
    mod = MSDeformAttn(32, 4, 2, 2, rngs=nnx.Rngs(1), impl="xla")
    shapes = ((4, 4), (2, 2))
    s = 20
    query = jnp.asarray(rng.normal(size=(1, 3, 32)), jnp.float32)
    ref = jnp.asarray(rng.uniform(size=(1, 3, 2, 2)), jnp.float32)
    value = rng.normal(size=(1, s, 32)).astype(np.float32)
    pad = np.zeros((1, s), bool)
    pad[0, 5:9] = True
    value2 = value.copy()
    value2[0, 5:9] += 100.0
    a = mod(query, ref, jnp.asarray(value), shapes, (0, 16), jnp.asarray(pad))
    b = mod(query, ref, jnp.asarray(value2), shapes, (0, 16), jnp.asarray(pad))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
