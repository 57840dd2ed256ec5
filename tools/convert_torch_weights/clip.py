"""Mapping table: transformers CLIP vision tower -> :class:`segllm_jax.models.clip_vision.ClipVision`.

Accepts ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / full ``CLIPModel`` key sets
(``vision_model.*``); the text tower, projections and blocks past the selected layer are listed as
ignored with the reason, so strict accounting still holds.
"""

from __future__ import annotations

from segllm_jax.config import VisionConfig
from segllm_jax_convert.engine import MappingTable, Rule, conv_kernel, linear_kernel

_V = r"(?:vision_model\.)?"  # transformers 5 saves CLIPVisionModel without the prefix


def _used_layers(cfg: VisionConfig) -> str:
    """A regex alternation of the encoder block indices that run (0 .. num_layers_run-1)."""
    return "|".join(str(i) for i in range(cfg.num_layers_run)) or "(?!)"


def clip_vision_table(cfg: VisionConfig) -> MappingTable:
    layer = _V + rf"encoder\.layers\.(?P<i>{_used_layers(cfg)})\."
    rules = [
        Rule(_V + r"embeddings\.patch_embedding\.weight", "patch_embedding", conv_kernel),
        Rule(_V + r"embeddings\.class_embedding", "class_embedding"),
        Rule(_V + r"embeddings\.position_embedding\.weight", "position_embedding"),
        Rule(_V + r"pre_layrnorm\.weight", "pre_layrnorm/scale"),
        Rule(_V + r"pre_layrnorm\.bias", "pre_layrnorm/bias"),
        *(Rule(layer + rf"{n}\.weight", f"layers/{{i}}/{n}/scale") for n in ("layer_norm1", "layer_norm2")),
        *(Rule(layer + rf"{n}\.bias", f"layers/{{i}}/{n}/bias") for n in ("layer_norm1", "layer_norm2")),
        *(Rule(layer + rf"self_attn\.{p}\.weight", f"layers/{{i}}/self_attn/{p}/kernel", linear_kernel)
          for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
        *(Rule(layer + rf"self_attn\.{p}\.bias", f"layers/{{i}}/self_attn/{p}/bias")
          for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
        *(Rule(layer + rf"mlp\.{p}\.weight", f"layers/{{i}}/{p}/kernel", linear_kernel) for p in ("fc1", "fc2")),
        *(Rule(layer + rf"mlp\.{p}\.bias", f"layers/{{i}}/{p}/bias") for p in ("fc1", "fc2")),
    ]
    ignore = (
        (_V + r"encoder\.layers\.\d+\..*",
         f"blocks after hidden_states[{cfg.select_layer}] never run"),
        (_V + r"post_layernorm\..*", "the selected layer is read before the final LayerNorm"),
        (_V + r"embeddings\.position_ids", "buffer: positions are implicit"),
        (r"visual_projection\.weight", "SegLLM reads hidden states, not the CLIP projection"),
        (r"text_model\..*", "text tower of a full CLIPModel is unused"),
        (r"text_projection\.weight", "text tower of a full CLIPModel is unused"),
        (r"logit_scale", "text tower of a full CLIPModel is unused"),
    )
    return MappingTable("clip_vision", tuple(rules), ignore)
