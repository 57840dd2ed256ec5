"""Mapping table: a released SegLLM checkpoint (``LlavaLlamaForCausalLM`` + HIPIE) -> :class:`SegLLM`.

Composed from the per-model tables (spec §9): the LLaMA keys (``model.*``, ``lm_head``) go to
``llm/``, ``model.vision_tower.vision_tower.*`` to ``vision_tower/``, ``model.mm_projector.*`` and
``model.segmentator_predictor.*`` through the mlp2x_gelu table, ``model.mask_enc_head.*`` to the
box encoder, and ``model.segmentator.hipie.*`` through the HIPIE table. Keys that belong to a
sub-model's prefix but not to its table are reported as unknown, never silently dropped.
"""

from __future__ import annotations

from segllm_jax.config import SegLLMConfig
from segllm_jax_convert.clip import clip_vision_table
from segllm_jax_convert.engine import MappingTable, Rule, linear_kernel
from segllm_jax_convert.hipie import SEGLLM_PREFIX, hipie_table
from segllm_jax_convert.llama import llama_table
from segllm_jax_convert.projector import mlp_projector_table

_SUBMODEL_PREFIXES = (r"model\.vision_tower\.", r"model\.mm_projector\.", r"model\.mask_enc_head\.",
                      r"model\.segmentator_predictor\.", r"model\.segmentator\.")


def segllm_table(cfg: SegLLMConfig) -> MappingTable:
    llm = llama_table(cfg.llm)
    # the LLaMA rules are anchored at "model." / "lm_head": keep them off the sub-model prefixes
    guard = "(?!" + "|".join(_SUBMODEL_PREFIXES) + ")"
    llm = MappingTable(llm.name, tuple(Rule(guard + r.source, "llm/" + r.target, r.transform) for r in llm.rules),
                       llm.ignore)
    box = MappingTable("mask_enc_head", (
        Rule(r"model\.mask_enc_head\.weight", "mask_enc_head/kernel", linear_kernel),
        Rule(r"model\.mask_enc_head\.bias", "mask_enc_head/bias"),
    ))
    return (llm
            + clip_vision_table(cfg.vision).under("model.vision_tower.vision_tower.", "vision_tower/")
            + mlp_projector_table("mm_projector").under("model.mm_projector.", "mm_projector/")
            + box
            + mlp_projector_table("segmentator_predictor").under("model.segmentator_predictor.",
                                                                 "segmentator_predictor/")
            + hipie_table(cfg.hipie.num_queries).under(SEGLLM_PREFIX, "segmentator/"))
