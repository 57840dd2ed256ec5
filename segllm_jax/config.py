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


# HIPIE's config lives next to its model (every field is a HIPIE hyper-parameter); re-exported here
# so every config type of the package is importable from one place.
from segllm_jax.models.hipie.config import HipieConfig  # noqa: E402


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
        toy widths, HIPIE on a 128 px frame (MR-Shapes scenes are 128-256 px), CLIP at 32 px."""
        return cls.tiny(vocab_size, **{"hipie_image_size": 128, **overrides})

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
