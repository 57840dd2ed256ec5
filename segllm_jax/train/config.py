"""``TrainConfig``: everything one training run depends on, as one frozen dataclass (architecture.md §T13).

Defaults are the released recipe (§T13): AdamW lr 2e-6, weight decay 0, cosine schedule with 3 %
warm-up, bf16 compute over float32 master weights, rematerialised LLM layers, 8 conversations per
step. ``tiny_cpu()`` is the preset the tests and ``configs/tiny_train.py`` start from.

Gradient clipping (``grad_clip_norm``) defaults to **None** on purpose. The original calls
``accelerator.clip_grad_norm_(model.parameters(), 5.0)`` in its custom ``training_step`` and HF
Trainer would clip at ``max_grad_norm=1.0`` too, but both go through ``Accelerator.clip_grad_norm_``,
which returns without clipping when DeepSpeed drives the model (DeepSpeed clips on its own, from the
config key ``gradient_clipping``), and ``scripts/deepspeed_configs/zero2.json`` has no such key, so
DeepSpeed's default 0.0 (off) applies. The released model was therefore trained without clipping.
Set 5.0 to follow the author's visible intent instead; the global gradient norm is logged either way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

from segllm_jax.config import SegLLMConfig
from segllm_jax.data.mixture import MixtureConfig
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.errors import ConfigError
from segllm_jax.quantize import LORA_BASE_QTYPES

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
# base_weights_qtype values: the float32 base, a bfloat16 one, or the qwix qtypes segllm_jax.quantize.QTYPE_TABLE
# offers for a QLoRA base
BASE_QTYPES: tuple[str, ...] = ("none", "bf16", *LORA_BASE_QTYPES)

# LoRA target presets: module paths ('/'-joined, matched with re.fullmatch) of the Linear layers that get adapters
LLM_TARGETS: tuple[str, ...] = (r"llm/layers/\d+/self_attn/[qkvo]_proj", r"llm/layers/\d+/mlp/(gate|up|down)_proj")
PREDICTOR_TARGETS: tuple[str, ...] = (r"segmentator_predictor/linear_[12]",)
HIPIE_TRANSFORMER_TARGETS: tuple[str, ...] = (r"segmentator/decoder/layers/\d+/.+",
                                              r"segmentator/encoder/layers/\d+/.+")


def _check_patterns(field: str, patterns: tuple[str, ...]) -> None:
    """Every pattern of a config field compiles as a regular expression, or a ConfigError names the bad one."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{field} pattern {pattern!r} is not a regular expression: {e}.") from None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters ``W + (alpha / rank) * A @ B`` on the Linear layers whose module path matches a ``targets``
    pattern (``re.fullmatch``, e.g. ``llm/layers/3/self_attn/q_proj``; :data:`LLM_TARGETS` by default, add
    :data:`PREDICTOR_TARGETS` / :data:`HIPIE_TRANSFORMER_TARGETS` for the ``<seg>`` predictor / HIPIE's
    transformer). Only the adapters and the parameters matching ``train`` (``re.search`` on parameter paths,
    still minus architecture.md §T12's frozen set) get gradients and Adam moments; every other parameter is
    frozen. ``dropout`` applies to the adapter's input in training only."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LLM_TARGETS
    train: tuple[str, ...] = (r"^segmentator_predictor/", r"^mask_enc_head/")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank!r} must be an integer >= 1.")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha!r} must be > 0.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1).")
        if isinstance(self.targets, str) or isinstance(self.train, str) or not self.targets:
            raise ConfigError("lora.targets (non-empty) and lora.train must be tuples of regular expressions.")
        _check_patterns("lora", (*self.targets, *self.train))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: SegLLMConfig
    data: MixtureConfig
    tokenizer_dir: str  # an HF tokenizer folder with SegLLM's added tokens
    init_checkpoint: str | None = None  # segllm-jax checkpoint folder; None = random init (seed)
    prepare_data: MRShapesData | None = None  # data the train command writes first (idempotent); None: it exists
    # batch and length
    batch_size: int = 8  # global conversations per step (2 per device x 4 GPUs in the original)
    steps: int = 1000
    pad_multiple: int = 64  # sequence length is padded to a multiple of this (fewer recompilations)
    ref_pad_multiple: int = 8  # references and <seg> prompts are padded to multiples of this
    worker_count: int = 0  # grain worker processes
    # optimisation (architecture.md §T13)
    learning_rate: float = 2e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float | None = None  # see the module docstring
    # losses (architecture.md §T10)
    prompt_l2_weight: float = 1e-3
    use_hipie_loss: bool = True  # False: LM CE + prompt L2 only (HIPIE gets no gradient)
    max_rounds: int = 2  # <seg> prompts per conversation sent to HIPIE (architecture.md §T1)
    hipie_prompts: int | None = None  # training aid: exactly this many prompts per step go to HIPIE (see step)
    mask_points: int = 112 * 112  # point-sampled mask loss: points per mask (TRAIN_NUM_POINTS, §T8)
    class_loss_weight: float = 2.0  # CLASS_WEIGHT of the HIPIE criterion (every loss_ce* term, §T9)
    ranking_loss_weight: float = 0.0  # training aid (not in the original): hipie_loss.target_ranking_loss
    # training aids for the LLM's image reading (not in the original; segllm_jax.train.aids): an L1 box head on each
    # supervised prompt's halves (the target's box from the last 4 tokens, the reference's from the first 4), and a
    # cross-entropy putting head 0 of the LLM's last layer, at the prompt's position, on the target's CLIP patches
    box_aid_weight: float = 0.0
    attention_aid_weight: float = 0.0
    # what trains
    freeze_pretrained: bool = True  # architecture.md §T12; False trains all but FrozenBN buffers (from-scratch runs)
    # a stage that trains part of the model, e.g. HIPIE's side (HIPIE_PARAMS) behind a frozen, reading LLM: regular
    # expressions (re.search on parameter paths) of what trains, still within freeze_pretrained's rule; None = all
    train_only: tuple[str, ...] | None = None
    lora: LoraConfig | None = None  # LoRA / QLoRA fine-tuning (segllm_jax.train.lora); None = full fine-tune
    # how a LoRA run stores its frozen base (one of BASE_QTYPES): "none" float32; "bf16" every frozen float leaf
    # in bfloat16; "int8" / "nf4" (QLoRA) the adapted layers' kernels quantized by qwix, the rest float32
    base_weights_qtype: str = "none"
    # numerics and memory
    compute_dtype: str = "bfloat16"  # activations; parameters and optimizer state stay float32
    remat: RematPolicy = "full"
    # parallelism: (data, fsdp, tensor); -1 = all remaining devices
    mesh_shape: tuple[int, int, int] = (1, -1, 1)
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    export_model: bool = True  # write WORKDIR/model (a segllm-jax checkpoint folder) at the end
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("batch_size, steps, checkpoint_every and keep_checkpoints must be >= 1.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"compute_dtype={self.compute_dtype!r}; use 'float32' or 'bfloat16'.")
        if self.remat not in ("none", "full", "dots", "dots_no_batch"):
            raise ConfigError(f"remat={self.remat!r}; use 'none', 'full', 'dots' or 'dots_no_batch'.")
        if len(self.mesh_shape) != 3:
            raise ConfigError(f"mesh_shape {self.mesh_shape} must be (data, fsdp, tensor).")
        if self.hipie_prompts is not None and (self.hipie_prompts < 1 or self.hipie_prompts % self.batch_size):
            raise ConfigError(f"hipie_prompts={self.hipie_prompts} must be a positive multiple of batch_size "
                              f"({self.batch_size}), so every host sends the same number of prompts.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"lora={self.lora!r} must be a LoraConfig (segllm_jax.train.config.LoraConfig).")
        if self.base_weights_qtype not in BASE_QTYPES:
            raise ConfigError(f"base_weights_qtype={self.base_weights_qtype!r} is not supported for a LoRA base; "
                              f"use one of {', '.join(BASE_QTYPES)} (none: float32, bf16: bfloat16, "
                              f"{' / '.join(LORA_BASE_QTYPES)}: QLoRA kernels quantized by qwix).")
        if min(self.box_aid_weight, self.attention_aid_weight, self.ranking_loss_weight) < 0:
            raise ConfigError("box_aid_weight, attention_aid_weight and ranking_loss_weight must be >= 0.")
        if self.attention_aid_weight and self.model.llm.num_layers < 2:
            raise ConfigError("attention_aid_weight needs an LLM of at least 2 layers (it supervises the last "
                              "layer's attention from the previous layer's output).")
        if self.train_only is not None:
            if isinstance(self.train_only, str) or not self.train_only or self.lora is not None:
                raise ConfigError("train_only must be a non-empty tuple of regular expressions, and a LoRA run says "
                                  "what trains with lora.train instead.")
            _check_patterns("train_only", self.train_only)
        if self.base_weights_qtype != "none" and self.lora is None:
            raise ConfigError(f"base_weights_qtype={self.base_weights_qtype!r} stores the frozen base of a LoRA "
                              "run; set lora=LoraConfig(...) too (a full fine-tune trains float32 weights).")

    @property
    def needs_masks(self) -> bool:
        """Whether training batches carry each prompt's target and reference masks (HIPIE's loss or an aid)."""
        return self.use_hipie_loss or self.box_aid_weight > 0 or self.attention_aid_weight > 0

    @property
    def clip_size(self) -> int:
        """CLIP input side of the data pipeline: the model's vision tower's."""
        return self.model.vision.image_size

    @property
    def frame(self) -> int:
        """HIPIE frame side of the data pipeline: the model's."""
        return self.model.hipie_image_size

    @property
    def warmup_steps(self) -> int:
        """HF's ``get_cosine_schedule_with_warmup``: ``ceil(steps * warmup_ratio)``."""
        return math.ceil(self.steps * self.warmup_ratio)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def tiny_cpu(data: MixtureConfig, tokenizer_dir: str, vocab_size: int, **overrides) -> TrainConfig:
    """A model that trains in seconds on a laptop CPU: tiny widths, 32 px CLIP, 64 px HIPIE frame."""
    base = dict(model=SegLLMConfig.tiny(vocab_size=vocab_size), data=data, tokenizer_dir=tokenizer_dir,
                batch_size=2, steps=8, pad_multiple=128, learning_rate=1e-3,
                warmup_ratio=0.0, compute_dtype="float32", remat="none", mesh_shape=(1, 1, 1),
                checkpoint_every=4, keep_checkpoints=2, use_hipie_loss=False, tensorboard=False)
    return TrainConfig(**{**base, **overrides})


def mrshapes_cpu(data: MixtureConfig, tokenizer_dir: str, vocab_size: int, **overrides) -> TrainConfig:
    """The learning proof on a 2-core CPU (both stages, ``configs/tiny_mrshapes*.py``): the tiny MR-Shapes model trained
    from scratch, so nothing is frozen (``freeze_pretrained=False``: the "pretrained" parts would be
    random); 1024 mask points (the 32 x 32 stride-4 mask has 1024 pixels; 12544 would only slow the
    step ~5x); fixed padding so the step compiles once; the HIPIE loss on, its classification weight
    5x the release's (10 instead of 2): from scratch, grounding the prompt (which shape the question
    names) is what lags behind masks and boxes, and a 400-step probe ranked the right query first
    1.5x as often with it; and the target-ranking aid (``ranking_loss_weight``, see
    ``hipie_loss.target_ranking_loss``), which the from-scratch model needs to tell shapes apart."""
    model = SegLLMConfig.tiny_mrshapes(vocab_size)
    base = dict(model=model, data=data, tokenizer_dir=tokenizer_dir, batch_size=8, steps=1900,
                pad_multiple=256, ref_pad_multiple=48, learning_rate=1e-3, warmup_ratio=0.03, compute_dtype="float32",
                remat="none", mesh_shape=(1, 1, 1), mask_points=1024, freeze_pretrained=False,
                class_loss_weight=10.0, ranking_loss_weight=5.0, use_hipie_loss=True, checkpoint_every=500,
                keep_checkpoints=2,
                tensorboard=True)
    return TrainConfig(**{**base, **overrides})


# The learning recipe's reading aids (segllm_jax.train.aids), on in each of its stages: the box head 10x heavier
# than the aid's unit weight (at 1 the prompt did not carry what the supervised attention head found), and the
# attention aid at 1 (docs/learning_proof.md has the runs behind both numbers)
READING_AIDS: dict[str, float] = {"box_aid_weight": 10.0, "attention_aid_weight": 1.0}
# HIPIE's side of the model (the segmentor, the <seg> predictor that writes its prompt, the DN label encoder), for
# TrainConfig.train_only: a grounding stage behind a frozen LLM (a variant of the recipe's stage 1; see
# docs/learning_proof.md)
HIPIE_PARAMS: tuple[str, ...] = (r"^segmentator/", r"^segmentator_predictor/", r"^segmentator_dn_resizer/")


def mrshapes_reading_cpu(data: MixtureConfig, tokenizer_dir: str, vocab_size: int, **overrides) -> TrainConfig:
    """The recipe's LLM-only reading stages (``configs/tiny_mrshapes_reading*.py``): :func:`mrshapes_cpu` with
    HIPIE's loss off and :data:`READING_AIDS` on, 8 conversations and 16 supervised prompts a step (a step
    costs about a quarter of one with HIPIE, so twice the conversations of the HIPIE stages)."""
    base = dict(use_hipie_loss=False, batch_size=8, max_rounds=6, hipie_prompts=16, **READING_AIDS)
    return mrshapes_cpu(data, tokenizer_dir, vocab_size, **{**base, **overrides})
