"""HIPIE segmentor configuration: every size of the model is a field (architecture.md §H1).

``hipie_r50_segllm()`` is the configuration SegLLM actually runs (``r50_pretrain.yaml`` ->
SegLLM's edited ``r50.yaml`` plus the overrides of ``hipie_utils.setup_cfg``; §H1 and §O2):
100 foreground queries, 10 background queries, mean token pooling, MaskDINO off.
``tiny()`` keeps every structural feature (4 levels, two-stage, bg queries, VL fusion, dynamic
mask head) at toy widths so unit tests run in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from segllm_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class HipieConfig:
    """All hyper-parameters of the HIPIE model as SegLLM builds it (§H1)."""

    # --- image normalisation (§D5; RGB order, applied to uint8 pixels) ---
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32

    # --- backbone: detectron2 ResNet-50 with FrozenBN (§H3) ---
    resnet_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)  # res2..res5
    stem_channels: int = 64
    res2_out_channels: int = 256
    bottleneck_base: int = 64  # num_groups * width_per_group; doubles per stage
    frozen_bn_eps: float = 1e-5

    # --- transformer (§H5, §H7, §H9) ---
    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    enc_points: int = 4
    dec_points: int = 4
    group_norm_groups: int = 32
    group_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5
    pos_temperature: float = 10000.0  # sine position encoding (§H4, §O13)

    # --- language side / VL fusion (§H6) ---
    prompt_tokens: int = 8
    text_dim: int = 768
    vl_hidden_dim: int = 2048
    vl_heads: int = 8
    vl_clamp: float = 50000.0
    vl_dropout: float = 0.1  # attention-probability dropout, training only (§O18)
    num_vl_layers: int = 1  # fusion only before encoder layer 0 (the only supported value)

    # --- two-stage query selection and decoder queries (§H8, §O1, §O3, §O4, §O5) ---
    num_queries: int = 100  # foreground queries = two-stage top-k (SegLLM edit: 900 -> 100)
    num_bg_queries: int = 10
    proposal_base_size: float = 0.05  # w = h = base * 2**level
    proposal_valid_min: float = 0.01
    proposal_valid_max: float = 0.99
    dn_number: int = 1  # denoising groups, training only

    # --- heads (§H10) ---
    box_mlp_layers: int = 3
    use_iou_branch: bool = True
    class_clamp: float = 50000.0
    resizer_eps: float = 1e-12  # detr.resizer LayerNorm (training-only DN label encoder)

    # --- CondInst mask branch (§H11 to §H13) ---
    mask_head_hidden: int = 256  # lay3 / lay4 / jia_dcn width
    mask_head_mid: int = 64  # lay1 output
    mask_feat_channels: int = 8  # lay2 output (dynamic-conv input features)
    dynamic_channels: int = 8
    controller_layers: int = 3  # dynamic conv layers (CTRL_LAYERS)
    controller_mlp_layers: int = 3
    use_rel_coords: bool = True
    mask_out_stride: int = 4
    mask_feat_stride: int = 8
    mask_threshold: float = 0.5

    # --- post-processing (§H14) ---
    nms_iou: float = 0.7
    test_topk: int = 100
    num_classes: int = 2  # class idx 0 = tokens 0-3 ("reference"), 1 = tokens 4-7 ("target")
    max_pool_tokens: bool = False  # token -> class score: mean (MAX_POOL off)

    # --- dtypes ---
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; parity tests use float32 (§O6)
    msda_impl: str = "auto"  # pallas_kernels.ms_deform_attn impl

    def __post_init__(self) -> None:
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not a supported dtype; "
                                  f"use one of {', '.join(_DTYPES)}.")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}.")
        if self.vl_hidden_dim % self.vl_heads:
            raise ConfigError(f"vl_hidden_dim={self.vl_hidden_dim} is not divisible by vl_heads={self.vl_heads}.")
        if self.d_model % self.group_norm_groups:
            raise ConfigError(f"d_model={self.d_model} is not divisible by group_norm_groups="
                              f"{self.group_norm_groups}.")
        if self.num_feature_levels != 4:
            raise ConfigError(f"num_feature_levels={self.num_feature_levels}: HIPIE uses res3/res4/res5 plus one "
                              "extra stride-2 level from res5, i.e. 4 levels (docs/architecture.md §H5).")
        if self.num_vl_layers != 1:
            raise ConfigError(f"num_vl_layers={self.num_vl_layers}: SegLLM's HIPIE fuses once, before encoder "
                              "layer 0 (NUM_VL_LAYERS=1); other values are not implemented.")
        if self.prompt_tokens % self.num_classes:
            raise ConfigError(f"prompt_tokens={self.prompt_tokens} must split evenly over "
                              f"num_classes={self.num_classes}.")

    @property
    def stage_out_channels(self) -> tuple[int, int, int, int]:
        """Output channels of res2..res5 (each stage doubles; 256/512/1024/2048 for R50)."""
        return tuple(self.res2_out_channels * 2 ** i for i in range(4))

    @property
    def stage_bottleneck_channels(self) -> tuple[int, int, int, int]:
        """Bottleneck (3x3 conv) width of res2..res5 (64/128/256/512 for R50)."""
        return tuple(self.bottleneck_base * 2 ** i for i in range(4))

    @property
    def backbone_out_channels(self) -> tuple[int, int, int]:
        """Channels of the returned maps res3, res4, res5 (512, 1024, 2048)."""
        return self.stage_out_channels[1:]

    @property
    def backbone_strides(self) -> tuple[int, int, int]:
        return (8, 16, 32)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_total_queries(self) -> int:
        """Inference query count: background queries first, then the top-k foreground ones (§O3)."""
        return self.num_bg_queries + self.num_queries

    @property
    def tokens_per_class(self) -> int:
        return self.prompt_tokens // self.num_classes

    @property
    def controller_out(self) -> int:
        """Dynamic-conv parameter count per query (169 for SegLLM; §H12)."""
        c, d, n = self.mask_feat_channels, self.dynamic_channels, self.controller_layers
        in0 = c + (2 if self.use_rel_coords else 0)
        weights = in0 * d + (n - 2) * d * d + d * 1
        biases = (n - 1) * d + 1
        return weights + biases

    @classmethod
    def hipie_r50_segllm(cls, **overrides: Any) -> "HipieConfig":
        """The configuration in force inside SegLLM (§H1)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "HipieConfig":
        """Toy widths, same structure (4 levels, bg queries, fusion, CondInst head)."""
        base = dict(
            resnet_blocks=(1, 1, 1, 1), stem_channels=8, res2_out_channels=16, bottleneck_base=4,
            d_model=32, num_heads=4, ffn_dim=64, enc_layers=2, dec_layers=2, enc_points=2, dec_points=2,
            group_norm_groups=8, prompt_tokens=8, text_dim=48, vl_hidden_dim=64, vl_heads=4,
            num_queries=12, num_bg_queries=3, mask_head_hidden=32, mask_head_mid=16, test_topk=20,
        )
        return cls(**{**base, **overrides})


def hipie_r50_segllm(**overrides: Any) -> HipieConfig:
    """Module-level alias of :meth:`HipieConfig.hipie_r50_segllm`."""
    return HipieConfig.hipie_r50_segllm(**overrides)


def tiny(**overrides: Any) -> HipieConfig:
    """Module-level alias of :meth:`HipieConfig.tiny`."""
    return HipieConfig.tiny(**overrides)
