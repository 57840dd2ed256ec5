"""Mapping table: a released SegLLM checkpoint (``LlavaLlamaForCausalLM`` + HIPIE) -> :class:`SegLLM`.

Composed from the per-model tables (architecture.md §A2): the LLaMA keys (``model.*``, ``lm_head``) go to
``llm/``, ``model.vision_tower.vision_tower.*`` to ``vision_tower/``, ``model.mm_projector.*`` and
``model.segmentator_predictor.*`` through the mlp2x_gelu table, ``model.mask_enc_head.*`` to the
box encoder, and ``model.segmentator.hipie.*`` through the HIPIE table. Keys that belong to a
sub-model's prefix but not to its table are reported as unknown, never silently dropped.

HIPIE's DN label encoder (``detr.resizer``) is not part of the inference model; :func:`dn_resizer_arrays`
converts it on its own (:func:`dn_resizer_training_table`), for the checkpoint's ``training_params/``.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import numpy as np
from flax import nnx

from segllm_jax.config import SegLLMConfig
from segllm_jax.models.hipie.training import DNLabelEncoder
from segllm_jax.models.segllm import DN_RESIZER
from segllm_jax_convert.clip import clip_vision_table
from segllm_jax_convert.engine import MappingTable, Rule, Transform, convert, flat_targets, linear_kernel
from segllm_jax_convert.hipie import SEGLLM_PREFIX, dn_resizer_table, hipie_table
from segllm_jax_convert.io import TensorSource
from segllm_jax_convert.llama import llama_table
from segllm_jax_convert.projector import mlp_projector_table

log = logging.getLogger(__name__)

_SUBMODEL_PREFIXES = (r"model\.vision_tower\.", r"model\.mm_projector\.", r"model\.mask_enc_head\.",
                      r"model\.segmentator_predictor\.", r"model\.segmentator\.")


def added_token_rows(new_rows: int, seed: int) -> Callable[[int], Transform]:
    """Appends ``new_rows`` rows drawn N(0, 0.02) to a ``[vocab, D]`` table (stream ``which``: 0 embed, 1 head).

    This is what ``resize_token_embeddings`` did in the transformers release SegLLM trained with
    (4.43: the new module is initialised with ``_init_weights``, normal(0, initializer_range=0.02),
    then the old rows are copied back); those rows are then frozen (§D2, §T12, §O21).
    """
    def for_table(which: int) -> Transform:
        def add(x: np.ndarray) -> np.ndarray:
            rows = np.random.default_rng([seed, which]).normal(0.0, 0.02, (new_rows, x.shape[1]))
            return np.concatenate([x, rows.astype(x.dtype)], axis=0)
        return add
    return for_table


def _then(first: Transform, second: Transform) -> Transform:
    """``second(first(x))``."""
    return lambda x: second(first(x))


def llava_table(cfg: SegLLMConfig, vocab_rows: Callable[[int], Transform] | None = None) -> MappingTable:
    """The LLaVA-1.5 part (LLaMA at ``model.*``/``lm_head`` and ``model.mm_projector.*``).

    ``vocab_rows(which)`` transforms ``embed_tokens`` (0) / ``lm_head`` (1): training init adds rows.
    """
    llm = llama_table(cfg.llm)
    # the LLaMA rules are anchored at "model." / "lm_head": keep them off the sub-model prefixes
    guard = "(?!" + "|".join(_SUBMODEL_PREFIXES) + ")"
    rules = []
    for r in llm.rules:
        transform = r.transform
        if vocab_rows is None:
            pass
        elif r.target == "embed_tokens/embedding":
            transform = vocab_rows(0)
        elif r.target == "lm_head/kernel":
            transform = _then(vocab_rows(1), r.transform)  # rows first
        rules.append(Rule(guard + r.source, "llm/" + r.target, transform))
    return (MappingTable("llava", tuple(rules), llm.ignore)
            + mlp_projector_table("mm_projector").under("model.mm_projector.", "mm_projector/"))


def segllm_table(cfg: SegLLMConfig) -> MappingTable:
    box = MappingTable("mask_enc_head", (
        Rule(r"model\.mask_enc_head\.weight", "mask_enc_head/kernel", linear_kernel),
        Rule(r"model\.mask_enc_head\.bias", "mask_enc_head/bias"),
    ))
    return (llava_table(cfg)
            + clip_vision_table(cfg.vision).under("model.vision_tower.vision_tower.", "vision_tower/")
            + box
            + mlp_projector_table("segmentator_predictor").under("model.segmentator_predictor.",
                                                                 "segmentator_predictor/")
            + hipie_table(cfg.hipie.num_queries).under(SEGLLM_PREFIX, "segmentator/"))


def dn_resizer_training_table(prefix: str) -> MappingTable:
    """``<prefix>detr.resizer.*`` <-> the trainer's DN label encoder (:data:`DN_RESIZER` ``/``) in a checkpoint's
    ``training_params/``, every other key ignored: :func:`dn_resizer_arrays` converts with it and
    ``export.state_dict`` inverts it, so both directions read one table.

    ``prefix``: where HIPIE's keys live (``model.segmentator.hipie.`` in a release, ``""`` in ``r50_parts.pth``).
    """
    own = re.escape(prefix + "detr.resizer.")
    return MappingTable("hipie_dn_resizer", dn_resizer_table().under(prefix, DN_RESIZER + "/").rules,
                        ignore=((f"(?!{own}).*", "not the DN label encoder (the main tables)"),))


def dn_resizer_arrays(source: TensorSource, cfg: SegLLMConfig, prefix: str, *,
                      progress: bool = True) -> dict[str, np.ndarray]:
    """The source's ``<prefix>detr.resizer.*`` as the trainer's DN label encoder (``segmentator_dn_resizer/``).

    Empty when the source has no such tensors: training then starts the encoder fresh.
    """
    own = prefix + "detr.resizer."
    if not any(key.startswith(own) for key in source):
        log.info("no %s* tensors: a training run from this checkpoint starts HIPIE's DN label encoder fresh", own)
        return {}
    encoder = nnx.eval_shape(lambda: DNLabelEncoder(cfg.hipie, rngs=nnx.Rngs(0)))
    targets = {f"{DN_RESIZER}/{path}": v for path, v in flat_targets(encoder).items()}
    return convert(source, dn_resizer_training_table(prefix), targets, progress=progress)
