"""SegLLM: the LLaVA half, the [SEG] predictor, the box encoder and HIPIE, composed (architecture.md §A1).

Three things make SegLLM more than LLaVA + a segmentor; each is reproduced here, oddities included:

* **Additive multimodal inputs (§D7, oddity §O19).** Image patch features and the reference
  encodings are *added* to the embeddings of their ``<video>`` placeholder tokens (the original's
  attempt to zero those embeddings first is a no-op), so the LLM sees ``E[<video>] + feature``.
* **Mask encoding (§D6).** A reference mask re-enters the conversation as two ``<video>`` tokens:
  the projected CLIP layer-(-2) CLS of the masked crop, and ``mask_enc_head`` (Linear 4 -> D) of
  its box ``[row0, col0, row1, col1] / 1024``; both multiplied by 0.5 at evaluation (the
  expectation of the training-time Bernoulli(0.5) gate, which has no 1/p rescale, §O22).
* **Mask-aware decoding (§D8, oddity §O20).** The prompt for HIPIE is the final-norm hidden
  state one position *before* each ``<seg>`` (the state whose logits predict ``<seg>``), mapped by
  ``segmentator_predictor`` to 8 x 768 tokens: tokens 0-3 stand for the reference, 4-7 for the target.

Parameter paths mirror the release's module names (``llm`` = the LLaMA at ``model.*``/``lm_head``,
``vision_tower``, ``mm_projector``, ``mask_enc_head``, ``segmentator_predictor``, ``segmentator``), plus
the training-only ``segmentator_dn_resizer`` (:data:`DN_RESIZER`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from segllm_jax.config import SegLLMConfig
from segllm_jax.models.clip_vision import ClipVision
from segllm_jax.models.hipie.model import Hipie
from segllm_jax.models.hipie.training import DNLabelEncoder
from segllm_jax.models.layers import Linear
from segllm_jax.models.llama import KVCache, Llama, LlamaOutput
from segllm_jax.models.projector import MlpProjector


def box_encoder(cfg: SegLLMConfig, rngs: nnx.Rngs) -> Linear:
    """``mask_enc_head``: Linear(4 -> D); new in SegLLM, so training starts from PyTorch's default init."""
    return Linear(4, cfg.llm.hidden_size, axes=(None, "embed"), rngs=rngs, param_dtype=cfg.llm.param_dtype,
                  dtype=cfg.llm.dtype)


def seg_predictor(cfg: SegLLMConfig, rngs: nnx.Rngs) -> MlpProjector:
    """``segmentator_predictor``: mlp2x_gelu D -> D -> 8 * 768; new in SegLLM like the box encoder."""
    return MlpProjector(cfg.predictor, rngs=rngs, in_axis="embed", out_axis="hipie_text")


# Parameter path (and training-checkpoint key prefix) of HIPIE's DN label encoder: the attribute below.
DN_RESIZER = "segmentator_dn_resizer"


class SegLLM(nnx.Module):
    """The composed model; ``dn_rngs`` also builds HIPIE's DN label encoder (``detr.resizer``, architecture.md
    §T2) at :data:`DN_RESIZER`: only the HIPIE training term uses it, so inference models leave it ``None``
    and their checkpoints hold no such parameters. Its own RNG stream keeps the other modules' init the same
    with or without it."""

    def __init__(self, cfg: SegLLMConfig, *, rngs: nnx.Rngs, dn_rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.llm = Llama(cfg.llm, rngs=rngs)
        self.vision_tower = ClipVision(cfg.vision, rngs=rngs)
        self.mm_projector = MlpProjector(cfg.projector, rngs=rngs)
        self.mask_enc_head = box_encoder(cfg, rngs)
        self.segmentator_predictor = seg_predictor(cfg, rngs)
        self.segmentator = Hipie(cfg.hipie, rngs=rngs)
        self.segmentator_dn_resizer: DNLabelEncoder | None = (
            None if dn_rngs is None else DNLabelEncoder(cfg.hipie, rngs=dn_rngs))

    # ---- what enters the LLM -------------------------------------------------------------------
    def image_embeds(self, clip_pixels: jax.Array) -> jax.Array:
        """CLIP-preprocessed images ``[I, 224, 224, 3]`` -> projected patch features ``[I, P, D]``."""
        return self.mm_projector(self.vision_tower.patch_features(clip_pixels))

    def mask_encode(self, crop_pixels: jax.Array) -> jax.Array:
        """CLIP-preprocessed masked crops ``[R, 224, 224, 3]`` -> ``[R, D]`` (before the gate)."""
        return self.mm_projector(self.vision_tower.cls_feature(crop_pixels))

    def box_encode(self, boxes: jax.Array) -> jax.Array:
        """Boxes ``[R, 4]`` as ``[row0, col0, row1, col1] / 1024`` -> ``[R, D]`` (before the gate)."""
        return self.mask_enc_head(boxes.astype(jnp.float32))

    def inputs_embeds(self, input_ids: jax.Array, slot_rows: jax.Array, slot_cols: jax.Array,
                      slot_values: jax.Array) -> jax.Array:
        """Token embeddings ``[B, T, D]`` with ``slot_values [N, D]`` added at ``(slot_rows, slot_cols)``."""
        embeds = self.llm.embed(input_ids)
        return embeds.at[slot_rows, slot_cols].add(slot_values.astype(embeds.dtype))

    # ---- what leaves the LLM -------------------------------------------------------------------
    def run_llm(self, inputs_embeds: jax.Array, token_mask: jax.Array | None = None,
                cache: KVCache | None = None, return_layer_outputs: bool = False) -> LlamaOutput:
        return self.llm(inputs_embeds, token_mask=token_mask, cache=cache, return_layer_outputs=return_layer_outputs)

    def seg_prompts(self, hidden: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
        """HIPIE prompts ``[N, 8, 768]`` from the hidden states at ``(rows, cols)`` (= ``<seg>`` position - 1)."""
        out = self.segmentator_predictor(hidden[rows, cols])  # [N, 8 * 768]
        return out.reshape(out.shape[0], self.cfg.hipie.prompt_tokens, self.cfg.hipie.text_dim)
