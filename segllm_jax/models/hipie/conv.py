"""NHWC convolution and per-channel normalisations shared by the HIPIE image side.

* :class:`Conv2d` keeps PyTorch's *symmetric* explicit padding (architecture.md §A3: "SAME" pads
  asymmetrically for stride 2 on even inputs, which shifts every stride-2 map by half a pixel).
  Kernels are HWIO (the converter's ``conv_kernel`` transposes OIHW).
* :class:`FrozenBatchNorm2d` keeps detectron2's four buffers as ``nnx.Param`` (logical axis
  ``norm``) so they map one-to-one onto checkpoint keys; training masks them out. The scale/shift
  fold happens in the forward, in float32 (§O14).
* :class:`GroupNorm` is PyTorch ``nn.GroupNorm``: contiguous channel groups, statistics over
  (H, W, channels of the group), in float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.models.layers import param, torch_linear_init


def conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int, padding: int, dtype: str) -> jax.Array:
    """Cross-correlation like ``torch.nn.functional.conv2d`` (no kernel flip), float32 accumulation."""
    dt = jnp.dtype(dtype)
    return jax.lax.conv_general_dilated(
        x.astype(dt), kernel.astype(dt), window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)


def _conv_kernel(rngs: nnx.Rngs, in_channels: int, out_channels: int, kernel_size: int,
                 param_dtype: str) -> nnx.Param:
    init = torch_linear_init(in_channels * kernel_size * kernel_size)
    return param(rngs, init, (kernel_size, kernel_size, in_channels, out_channels),
                 ("conv_kernel", "conv_kernel", "conv_in", "conv_out"), param_dtype)


class Conv2d(nnx.Module):
    """2-d convolution on NHWC maps with an HWIO kernel and symmetric zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, use_bias: bool = True, rngs: nnx.Rngs,
                 param_dtype: str = "float32", dtype: str = "float32"):
        self.kernel = _conv_kernel(rngs, in_channels, out_channels, kernel_size, param_dtype)
        init = torch_linear_init(in_channels * kernel_size * kernel_size)
        self.bias = param(rngs, init, (out_channels,), ("conv_out",), param_dtype) if use_bias else None
        self.stride = stride
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H', W', Cout]
        y = conv_nhwc(x, self.kernel[...], self.stride, self.padding, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class FrozenBatchNorm2d(nnx.Module):
    """detectron2 ``FrozenBatchNorm2d``: y = x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-5, param_dtype: str = "float32",
                 dtype: str = "float32"):
        self.weight = param(rngs, nnx.initializers.ones, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("norm",), param_dtype)
        self.running_mean = param(rngs, nnx.initializers.zeros, (channels,), ("norm",), param_dtype)
        self.running_var = param(rngs, nnx.initializers.ones, (channels,), ("norm",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., C]
        # the buffers are frozen: no gradient ever flows into them (training masks them too)
        w, b, mean, var = (jax.lax.stop_gradient(v[...].astype(jnp.float32)) for v in
                           (self.weight, self.bias, self.running_mean, self.running_var))
        scale = w * jax.lax.rsqrt(var + self.eps)
        shift = b - mean * scale
        return (x.astype(jnp.float32) * scale + shift).astype(self.dtype)


class ConvFrozenBN(nnx.Module):
    """detectron2 ``Conv2d(..., bias=False, norm=FrozenBN)``: parameters ``kernel`` and ``norm/*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, eps: float = 1e-5, rngs: nnx.Rngs, param_dtype: str = "float32",
                 dtype: str = "float32"):
        self.kernel = _conv_kernel(rngs, in_channels, out_channels, kernel_size, param_dtype)
        self.stride, self.padding, self.dtype = stride, padding, dtype
        self.norm = FrozenBatchNorm2d(out_channels, rngs=rngs, eps=eps, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H', W', Cout]
        return self.norm(conv_nhwc(x, self.kernel[...], self.stride, self.padding, self.dtype))


class GroupNorm(nnx.Module):
    """PyTorch ``nn.GroupNorm(num_groups, C)`` on NHWC maps (contiguous channel groups; §A3)."""

    def __init__(self, num_groups: int, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-5,
                 param_dtype: str = "float32", dtype: str = "float32"):
        if channels % num_groups:
            raise ValueError(f"channels={channels} is not divisible by num_groups={num_groups}")
        self.weight = param(rngs, nnx.initializers.ones, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("norm",), param_dtype)
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        b, h, w, c = x.shape
        g = self.num_groups
        x32 = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        mean = x32.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]
    """``F.max_pool2d(kernel 3, stride 2, padding 1)``: the padding is -inf, never a real value.

    The init value is a host constant so JAX recognises a max-pool and can differentiate it (a traced
    init value cannot be linearised; training from scratch back-propagates into the stem).
    """
    return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


__all__: Sequence[str] = ("conv_nhwc", "Conv2d", "FrozenBatchNorm2d", "ConvFrozenBN", "GroupNorm", "max_pool_3x3_s2")
