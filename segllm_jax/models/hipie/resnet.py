"""detectron2 ResNet-50 with FrozenBN, as HIPIE's backbone (architecture.md §H3, §A2).

* STRIDE_IN_1X1 = False: the stride-2 of res3/res4/res5 sits in the 3x3 ``conv2`` of block 0.
* Convs have no bias; every conv owns a FrozenBN ``norm`` (stem included).
* Padding is PyTorch-symmetric (§A3): 3 for the 7x7 stem, 1 for every 3x3; the stem
  max-pool pads with -inf.
* res2 is computed but not returned; outputs are res3 (stride 8), res4 (16), res5 (32), NHWC.

Parameter paths mirror the checkpoint: ``stem/conv1/{kernel,norm/*}``,
``res{2..5}/{i}/{conv1,conv2,conv3,shortcut}/{kernel,norm/{weight,bias,running_mean,running_var}}``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.conv import ConvFrozenBN, max_pool_3x3_s2


class BackboneFeatures(NamedTuple):
    """ResNet outputs, NHWC."""

    res3: jax.Array  # [I, H/8, W/8, 512]
    res4: jax.Array  # [I, H/16, W/16, 1024]
    res5: jax.Array  # [I, H/32, W/32, 2048]


class BasicStem(nnx.Module):
    """conv 7x7/2 (pad 3) -> FrozenBN -> ReLU -> max-pool 3x3/2 (pad 1)."""

    def __init__(self, in_channels: int, out_channels: int, *, eps: float, rngs: nnx.Rngs,
                 param_dtype: str = "float32", dtype: str = "float32"):
        self.conv1 = ConvFrozenBN(in_channels, out_channels, 7, stride=2, padding=3, eps=eps, rngs=rngs,
                                  param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # [I, H, W, 3] -> [I, H/4, W/4, 64]
        return max_pool_3x3_s2(jax.nn.relu(self.conv1(x)))


class BottleneckBlock(nnx.Module):
    """1x1 -> 3x3 (stride here) -> 1x1, each with FrozenBN; projection shortcut when shapes change."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, *, stride: int,
                 eps: float, rngs: nnx.Rngs, param_dtype: str = "float32", dtype: str = "float32"):
        kw = dict(eps=eps, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.shortcut = (ConvFrozenBN(in_channels, out_channels, 1, stride=stride, **kw)
                         if in_channels != out_channels else None)
        self.conv1 = ConvFrozenBN(in_channels, bottleneck_channels, 1, **kw)
        self.conv2 = ConvFrozenBN(bottleneck_channels, bottleneck_channels, 3, stride=stride, padding=1, **kw)
        self.conv3 = ConvFrozenBN(bottleneck_channels, out_channels, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # [I, H, W, Cin] -> [I, H/s, W/s, Cout]
        y = jax.nn.relu(self.conv1(x))
        y = jax.nn.relu(self.conv2(y))
        y = self.conv3(y)
        short = self.shortcut(x) if self.shortcut is not None else x
        return jax.nn.relu(y + short)


class ResNet(nnx.Module):
    """detectron2 ``ResNet`` (depth from ``cfg.resnet_blocks``); ``__call__`` -> res3, res4, res5."""

    def __init__(self, cfg: HipieConfig, *, rngs: nnx.Rngs):
        kw = dict(eps=cfg.frozen_bn_eps, rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.stem = BasicStem(3, cfg.stem_channels, **kw)
        in_ch = cfg.stem_channels
        stages = []
        for s, (n_blocks, width, out_ch) in enumerate(zip(cfg.resnet_blocks, cfg.stage_bottleneck_channels,
                                                            cfg.stage_out_channels, strict=True)):
            blocks = []
            for i in range(n_blocks):
                stride = 2 if (i == 0 and s > 0) else 1  # res2 keeps stride 1 (the stem already pooled)
                blocks.append(BottleneckBlock(in_ch, width, out_ch, stride=stride, **kw))
                in_ch = out_ch
            stages.append(nnx.List(blocks))
        self.res2, self.res3, self.res4, self.res5 = stages
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> BackboneFeatures:  # x: [I, H, W, 3] normalised pixels
        x = self.stem(x.astype(self.dtype))
        outs = []
        for stage in (self.res2, self.res3, self.res4, self.res5):
            for block in stage:
                x = block(x)
            outs.append(x)
        return BackboneFeatures(*outs[1:])
