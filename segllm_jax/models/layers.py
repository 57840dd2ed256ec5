"""Small building blocks shared by every model: parameters carry logical axis names.

Every parameter is an ``nnx.Param`` with a ``logical_axes`` metadata tuple (one name or ``None``
per dimension). Modules never see a mesh: ``segllm_jax.sharding`` maps the names to mesh axes in
one place. Kernels use the JAX layout ``[in, out]`` (the converter transposes PyTorch's
``[out, in]``).

Compute follows the usual mixed-precision split: parameters live in ``param_dtype`` and are cast
to the compute ``dtype`` right before use; normalisations compute their statistics in float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes, dtype: str) -> nnx.Param:
    """A parameter initialised with ``init`` and tagged with its logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.dtype(dtype)), logical_axes=tuple(axes))


def torch_linear_init(fan_in: int) -> Initializer:
    """PyTorch's default ``nn.Linear`` init (uniform ±1/sqrt(fan_in)): fresh heads start as in the original."""
    bound = fan_in ** -0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def compute_weight(weight, dtype: jnp.dtype):
    """A weight's value in the compute ``dtype``; a weight quantized by qwix (``segllm_jax.quantize``, QLoRA) stays
    quantized, its scales cast to ``dtype``: qwix's intercepted ``jnp.dot`` takes it and dequantizes into ``dtype``."""
    value = weight[...]
    if hasattr(value, "array"):  # qwix's WithAux[QArray]
        return value.replace(array=value.array.astype(dtype))
    return value.astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]``."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs,
                 use_bias: bool = True, param_dtype: str = "float32", dtype: str = "float32"):
        init = torch_linear_init(in_features)
        self.kernel = param(rngs, init, (in_features, out_features), axes, param_dtype)
        self.bias = param(rngs, init, (out_features,), axes[-1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        y = jnp.dot(x.astype(dtype), compute_weight(self.kernel, dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32."""

    def __init__(self, features: int, *, axis_name: str | None, rngs: nnx.Rngs, eps: float = 1e-5,
                 param_dtype: str = "float32", dtype: str = "float32"):
        self.scale = param(rngs, nnx.initializers.ones, (features,), (axis_name,), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (features,), (axis_name,), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (the HF order of operations)."""

    def __init__(self, features: int, *, axis_name: str | None, rngs: nnx.Rngs, eps: float = 1e-6,
                 param_dtype: str = "float32", dtype: str = "float32"):
        self.scale = param(rngs, nnx.initializers.ones, (features,), (axis_name,), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (self.scale[...].astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


class Embed(nnx.Module):
    """A lookup table ``[num, features]``; ``attend`` is the tied-output matmul."""

    def __init__(self, num_embeddings: int, features: int, *, axes: Axes, rngs: nnx.Rngs,
                 param_dtype: str = "float32", dtype: str = "float32"):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (num_embeddings, features), axes, param_dtype)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T,
                       preferred_element_type=jnp.float32)
