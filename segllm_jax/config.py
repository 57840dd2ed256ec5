"""Model configurations as typed, frozen dataclasses.

A config is data: presets are classmethods returning the same types that ``from_hf_dict``
builds from a checkpoint's ``config.json``, so code never needs to know where a config came from.
Dtypes are stored as strings ("float32", "bfloat16") so configs stay hashable and JSON-friendly;
``jnp.dtype(cfg.dtype)`` turns them into dtypes at the edges.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from segllm_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _check_dtype(name: str, value: str) -> None:
    if value not in _DTYPES:
        raise ConfigError(f"{name}={value!r} is not a supported dtype; use one of {', '.join(_DTYPES)}.")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A LLaMA-family decoder (LLaVA-1.5 / Vicuna-v1.5 for SegLLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype

    def __post_init__(self) -> None:
        _check_dtype("param_dtype", self.param_dtype)
        _check_dtype("dtype", self.dtype)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )

    @classmethod
    def llava_7b(cls, vocab_size: int = 32011, **overrides: Any) -> "LlamaConfig":
        """LLaVA-1.5-7B (LLaMA-2-7B shapes). The vocabulary comes from the checkpoint."""
        base = dict(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_layers=32,
                    num_heads=32, num_kv_heads=32, head_dim=128)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, vocab_size: int = 32011, **overrides: Any) -> "LlamaConfig":
        """CPU-test sizes: compiles in seconds, still GQA (2 query heads per KV head)."""
        base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "LlamaConfig":
        """Reads a transformers LLaMA/LLaVA ``config.json`` (transformers 4 and 5 layouts)."""
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope = d.get("rope_parameters") or {}  # transformers >= 5 moves rope_theta here
            if d.get("rope_scaling"):
                raise ConfigError(f"rope_scaling={d['rope_scaling']!r} is not supported; LLaVA-1.5 uses none.")
            if rope.get("rope_type", "default") != "default":
                raise ConfigError(f"rope_type={rope['rope_type']!r} is not supported; LLaVA-1.5 uses 'default'.")
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                **overrides,
            )
        except KeyError as e:
            raise ConfigError(f"LLaMA config.json lacks the field {e.args[0]!r}.") from None
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ConfigError(f"LLaMA config.json has a field of the wrong type or value ({e}).") from None


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT vision tower, read at ``hidden_states[select_layer]``."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2
    select_feature: str = "patch"  # "patch" drops CLS, "cls_patch" keeps it; mask-encode asks for "cls"
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_dtype("param_dtype", self.param_dtype)
        _check_dtype("dtype", self.dtype)
        if self.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"select_feature={self.select_feature!r}; expected 'patch' or 'cls_patch'.")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"hidden_act={self.hidden_act!r}; expected 'quick_gelu' or 'gelu'.")
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise ConfigError(f"select_layer={self.select_layer} is outside 0..{self.num_layers}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_layers_run(self) -> int:
        """Blocks that must run to produce ``hidden_states[select_layer]`` (index 0 = embeddings)."""
        return self.select_layer % (self.num_layers + 1)

    @classmethod
    def clip_vit_l14(cls, **overrides: Any) -> "VisionConfig":
        """``openai/clip-vit-large-patch14`` at 224 px, as SegLLM uses it."""
        base = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                    image_size=224, patch_size=14)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "VisionConfig":
        base = dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                    image_size=32, patch_size=8)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "VisionConfig":
        """Reads a CLIP ``config.json`` (the full CLIP config or its ``vision_config``)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a CLIP config must be a JSON object, not a {type(d).__name__}.")
        d = d.get("vision_config", d)
        try:
            return cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                image_size=int(d["image_size"]),
                patch_size=int(d["patch_size"]),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
                hidden_act=str(d.get("hidden_act", "quick_gelu")),
                **overrides,
            )
        except KeyError as e:
            raise ConfigError(f"CLIP vision config.json lacks the field {e.args[0]!r}.") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"CLIP vision config.json has a field of the wrong type or value ({e}).") from None


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """``mlp2x_gelu``: Linear(in -> out), GELU, Linear(out -> out)."""

    in_features: int
    out_features: int
    hidden_features: int | None = None  # defaults to out_features, as in LLaVA
    param_dtype: str = "float32"
    dtype: str = "float32"

    @classmethod
    def for_models(cls, vision: VisionConfig, llm: LlamaConfig) -> "ProjectorConfig":
        return cls(in_features=vision.hidden_size, out_features=llm.hidden_size,
                   param_dtype=llm.param_dtype, dtype=llm.dtype)


def load_json(path: str | Path) -> dict[str, Any]:
    """Reads a ``config.json`` with a clear error for a missing or broken file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; a checkpoint folder needs its config.json.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a JSON-ready dict (nested configs included)."""
    return dataclasses.asdict(cfg)


@dataclasses.dataclass(frozen=True)
class HipieConfig:
    """HIPIE, the segmentor: every size of the model is a field (architecture.md §H1).

    ``hipie_r50_segllm()`` is the configuration SegLLM actually runs (``r50_pretrain.yaml`` -> SegLLM's
    edited ``r50.yaml`` plus the overrides of ``hipie_utils.setup_cfg``; §H1 and §O2): 100 foreground
    queries, 10 background queries, mean token pooling, MaskDINO off. ``tiny()`` keeps every structural
    feature (4 levels, two-stage, bg queries, VL fusion, dynamic mask head) at toy widths so unit tests
    run in seconds on a CPU.
    """

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
    # widest per-block intermediate (bytes) of the VL fusion and encoder FFN, run over blocks of image tokens
    # (models/hipie/token_blocks.py); None: 16 MiB on CPU, 256 MiB on GPU/TPU
    token_block_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_dtype("param_dtype", self.param_dtype)
        _check_dtype("dtype", self.dtype)
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


@dataclasses.dataclass(frozen=True)
class SegLLMConfig:
    """The assembled model: LLaVA half + [SEG] predictor + box encoder + HIPIE (architecture.md §A1, §A2)."""

    llm: LlamaConfig
    vision: VisionConfig
    hipie: HipieConfig
    num_image_tokens: int = 256  # <video> tokens of the image (= CLIP patches)
    eval_reference_gate: float = 0.5  # mask/box-encode ×0.5 at evaluation (architecture.md §D6)
    max_length: int = 2048  # model_max_length of the original tokenizer/collator (architecture.md §D3)
    hipie_image_size: int = 1024  # HIPIE input side (architecture.md §D5)

    def __post_init__(self) -> None:
        if self.num_image_tokens != self.vision.num_patches:
            raise ConfigError(f"num_image_tokens={self.num_image_tokens} but the vision tower makes "
                              f"{self.vision.num_patches} patches.")

    @property
    def context_length(self) -> int:
        """Tokens a conversation may have: the tokenizer limit, capped by the LLM's positions."""
        return min(self.max_length, self.llm.max_position_embeddings)

    @property
    def projector(self) -> ProjectorConfig:
        return ProjectorConfig.for_models(self.vision, self.llm)

    @property
    def predictor(self) -> ProjectorConfig:
        """``segmentator_predictor``: mlp2x_gelu hidden -> hidden -> prompt_tokens * text_dim (architecture.md §M3)."""
        return ProjectorConfig(self.llm.hidden_size, self.hipie.prompt_tokens * self.hipie.text_dim,
                               hidden_features=self.llm.hidden_size, param_dtype=self.llm.param_dtype,
                               dtype=self.llm.dtype)

    @classmethod
    def segllm_7b(cls, vocab_size: int = 32011, **overrides: Any) -> "SegLLMConfig":
        """The released SegLLM: LLaVA-1.5-7B + CLIP ViT-L/14 (224) + HIPIE R50."""
        return cls(LlamaConfig.llava_7b(vocab_size), VisionConfig.clip_vit_l14(),
                   HipieConfig.hipie_r50_segllm(), **overrides)

    @classmethod
    def tiny(cls, vocab_size: int = 32011, **overrides: Any) -> "SegLLMConfig":
        base = dict(llm=LlamaConfig.tiny(vocab_size), vision=VisionConfig.tiny(), hipie=HipieConfig.tiny(),
                    hipie_image_size=64)
        base.update(overrides)
        return cls(**{"num_image_tokens": base["vision"].num_patches, **base})

    @classmethod
    def tiny_mrshapes(cls, vocab_size: int, **overrides: Any) -> "SegLLMConfig":
        """The learning-proof model (``configs/tiny_mrshapes*.py``): every part of the real architecture at
        toy widths, HIPIE on a 128 px frame (MR-Shapes scenes are 128-256 px), CLIP at 64 px in 8 px patches (an
        8 x 8 grid: at 32 px a patch spans a quarter of the image's side, too coarse to tell small shapes apart)."""
        return cls.tiny(vocab_size, **{"hipie_image_size": 128, "vision": VisionConfig.tiny(image_size=64),
                                       **overrides})

    @classmethod
    def from_release(cls, config: Mapping[str, Any], vision: VisionConfig | None = None,
                     hipie: HipieConfig | None = None) -> "SegLLMConfig":
        """From a released checkpoint's ``config.json`` (``model_type`` llava with the ``mm_*`` fields).

        The release does not describe the CLIP tower (the original downloads
        ``mm_vision_tower``); ViT-L/14 is assumed unless ``vision`` is given. A ``segllm_jax``
        entry in ``config.json`` (our extension, used by tiny test checkpoints) may carry
        ``vision`` (CLIP config fields), ``hipie`` (HipieConfig fields) and ``hipie_image_size``.
        """
        ext = config.get("segllm_jax", {})
        if vision is None and "vision" in ext:
            vision = VisionConfig.from_hf_dict(ext["vision"])
        if hipie is None and "hipie" in ext:
            hipie = HipieConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ext["hipie"].items()})
        if config.get("segmentator") != "hipie":
            raise ConfigError(f"config.json has segmentator={config.get('segmentator')!r}; "
                              "a SegLLM checkpoint has 'hipie'.")
        if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ConfigError(f"mm_projector_type={config['mm_projector_type']!r} is not supported.")
        vision = vision or VisionConfig.clip_vit_l14()
        vision = dataclasses.replace(vision, select_layer=int(config.get("mm_vision_select_layer", -2)),
                                     select_feature=config.get("mm_vision_select_feature", "patch"))
        if int(config.get("mm_hidden_size", vision.hidden_size)) != vision.hidden_size:
            raise ConfigError(f"mm_hidden_size={config['mm_hidden_size']} does not match the vision tower "
                              f"width {vision.hidden_size}; pass the right vision config.")
        return cls(LlamaConfig.from_hf_dict(config), vision, hipie or HipieConfig.hipie_r50_segllm(),
                   num_image_tokens=vision.num_patches,
                   hipie_image_size=int(ext.get("hipie_image_size", 1024)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SegLLMConfig":
        """Inverse of ``dataclasses.asdict`` (nested configs; tuples restored)."""
        hipie_fields = {f.name: f for f in dataclasses.fields(HipieConfig)}
        hipie = {k: tuple(v) if isinstance(v, list) else v for k, v in d["hipie"].items() if k in hipie_fields}
        rest = {k: v for k, v in d.items() if k not in ("llm", "vision", "hipie")}
        return cls(LlamaConfig(**d["llm"]), VisionConfig(**d["vision"]), HipieConfig(**hipie), **rest)
