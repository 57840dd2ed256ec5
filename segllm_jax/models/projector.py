"""``mlp2x_gelu``: the LLaVA projector, also SegLLM's ``segmentator_predictor`` (architecture.md §M3).

PyTorch's ``nn.GELU()`` is the exact (erf) GELU, so ``approximate=False``.
"""

from __future__ import annotations

import jax
from flax import nnx

from segllm_jax.config import ProjectorConfig
from segllm_jax.models.layers import Linear


class MlpProjector(nnx.Module):
    def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs, in_axis: str = "vision_embed",
                 out_axis: str = "embed"):
        hidden = cfg.hidden_features or cfg.out_features
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.linear_1 = Linear(cfg.in_features, hidden, axes=(in_axis, "mlp"), **kw)
        self.linear_2 = Linear(hidden, cfg.out_features, axes=("mlp", out_axis), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))
