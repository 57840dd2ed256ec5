"""detectron2 ResNet-50 (FrozenBN): blocks vs a float64 NumPy evaluation, backbone vs golden."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.resnet import BasicStem, BottleneckBlock, ResNet

from .conftest import GOLDEN_256, build_abstract, build_random, compare, convert_subtree, normalized_image_nhwc


def _np_conv(x, k, stride, pad):  # x [B,H,W,Ci] f64, k [kh,kw,Ci,Co]
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] + 2 * pad - kh) // stride + 1
    wo = (x.shape[2] + 2 * pad - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ k[i, j]
    return out


def _np_convbn(m, x):
    y = _np_conv(x, np.asarray(m.kernel[...], np.float64), m.stride, m.padding)
    n = m.norm
    w, b, mu, var = (np.asarray(v[...], np.float64) for v in (n.weight, n.bias, n.running_mean, n.running_var))
    scale = w / np.sqrt(var + n.eps)
    return y * scale + (b - mu * scale)


def _randomise(module: nnx.Module, seed: int) -> None:
    """Random weights with non-trivial FrozenBN statistics (the defaults would make BN an identity)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        shape = var[...].shape
        name = path[-1]
        if name == "kernel":
            v = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name in ("weight", "running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        else:
            v = rng.normal(0, 0.1, shape)
        var.set_value(jnp.asarray(v, jnp.float32))
    nnx.update(module, nnx.from_flat_state(flat))


@pytest.mark.parametrize("cin,width,cout,stride,hw", [(16, 8, 32, 1, 9), (32, 8, 32, 1, 8), (32, 16, 64, 2, 8),
                                                      (32, 16, 64, 2, 7)])
def test_bottleneck_matches_numpy_float64(cin, width, cout, stride, hw) -> None:
    block = BottleneckBlock(cin, width, cout, stride=stride, eps=1e-5, rngs=nnx.Rngs(0))
    _randomise(block, seed=cin + width + stride + hw)
    x = np.random.default_rng(3).normal(size=(2, hw, hw, cin))
    got = np.asarray(block(jnp.asarray(x, jnp.float32)))
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    y = relu(_np_convbn(block.conv1, x))
    y = relu(_np_convbn(block.conv2, y))
    y = _np_convbn(block.conv3, y)
    short = _np_convbn(block.shortcut, x) if block.shortcut is not None else x
    want = relu(y + short)
    assert got.shape == want.shape == (2, -(-hw // stride), -(-hw // stride), cout)  # symmetric pad: ceil
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_stem_matches_numpy_float64() -> None:
    stem = BasicStem(3, 8, eps=1e-5, rngs=nnx.Rngs(0))
    _randomise(stem, seed=5)
    x = np.random.default_rng(4).normal(size=(1, 18, 14, 3))
    got = np.asarray(stem(jnp.asarray(x, jnp.float32)))
    y = np.maximum(_np_convbn(stem.conv1, x), 0)  # [1, 9, 7, 8]
    yp = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (y.shape[1] - 1) // 2 + 1, (y.shape[2] - 1) // 2 + 1
    want = np.full((1, ho, wo, 8), -np.inf)
    for i in range(3):
        for j in range(3):
            want = np.maximum(want, yp[:, i:i + 2 * ho:2, j:j + 2 * wo:2])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_tiny_resnet_shapes() -> None:
    cfg = HipieConfig.tiny()
    net = build_random(lambda: ResNet(cfg, rngs=nnx.Rngs(0)))
    feats = net(jnp.zeros((1, 64, 48, 3)))
    assert [f.shape for f in feats] == [(1, 8, 6, c) for c in cfg.backbone_out_channels[:1]] + [
        (1, 4, 3, cfg.backbone_out_channels[1]), (1, 2, 2, cfg.backbone_out_channels[2])]


@pytest.mark.golden
@pytest.mark.parametrize("golden_file", GOLDEN_256)
def test_backbone_golden(golden_file, recipe_pth) -> None:
    data = np.load(golden_file)
    seed = int(data["seed"])
    net = build_abstract(lambda: ResNet(HipieConfig.hipie_r50_segllm(), rngs=nnx.Rngs(0)))
    convert_subtree(recipe_pth(seed), net, "backbone/")
    x = normalized_image_nhwc(data)
    print(f"\n[{golden_file.name}] seed={seed} backbone")
    compare("normalized_image", x.transpose(0, 3, 1, 2), data["normalized_image"])
    feats = nnx.jit(lambda m, v: m(v))(net, jnp.asarray(x))
    for name, got in zip(("res3", "res4", "res5"), feats, strict=True):
        compare(name, np.asarray(got).transpose(0, 3, 1, 2), data[name], atol_rel=1e-3)
