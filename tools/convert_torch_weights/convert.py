"""``segllm-jax convert SRC DST``: PyTorch/HF checkpoint -> segllm-jax checkpoint folder.

The kind of SRC is detected from its contents (``config.json``'s ``model_type``, or the key set of
a bare state dict). Everything is converted and checked in memory first, so a checkpoint that does
not match writes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flax import nnx

from segllm_jax import checkpoint
from segllm_jax.config import HipieConfig, LlamaConfig, SegLLMConfig, VisionConfig, load_json
from segllm_jax.errors import CheckpointError
from segllm_jax.models.segllm import box_encoder, seg_predictor
from segllm_jax.outputs import check_destination, written_atomically
from segllm_jax_convert.clip import clip_vision_table
from segllm_jax_convert.engine import MappingTable, convert, flat_targets
from segllm_jax_convert.hipie import SEGLLM_PREFIX, hipie_table
from segllm_jax_convert.io import TensorSource, open_checkpoint
from segllm_jax_convert.llama import llama_table
from segllm_jax_convert.segllm import added_token_rows, dn_resizer_arrays, llava_table, segllm_table

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One convertible source: how to read its config, which table maps it and, for a model that is
    trained further, which training-only arrays (``training_params/``) to keep from it."""

    model_kind: str
    read_config: Callable[[Path, TensorSource, VisionConfig | None], Any]
    table: Callable[[Any], MappingTable]
    training_arrays: Callable[[TensorSource, Any, bool], dict[str, np.ndarray]] = lambda _s, _c, _p: {}


def _hf_config(src: Path) -> dict:
    config = load_json(src / "config.json") if src.is_dir() else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{src / 'config.json'} must hold a JSON object, not a {type(config).__name__}.")
    return config


def _hipie_config(_src: Path, source: TensorSource, _vision) -> HipieConfig:
    """SegLLM's HIPIE; the foreground query count is read from the checkpoint's ``tgt_embed`` (architecture.md §O1)."""
    key = next((k for k in source if k.endswith("detr.detr.transformer.tgt_embed.weight")), None)
    num_queries = 100 if key is None else min(100, source[key].shape[0])
    return HipieConfig.hipie_r50_segllm(num_queries=num_queries)


def _segllm_config(src: Path, source: TensorSource, vision: VisionConfig | None) -> SegLLMConfig:
    config = _hf_config(src)
    custom_hipie = "hipie" in config.get("segllm_jax", {})
    return SegLLMConfig.from_release(config, vision, None if custom_hipie else _hipie_config(src, source, vision))


SOURCE_KINDS: dict[str, SourceKind] = {
    "llama": SourceKind("llama", lambda src, _s, _v: LlamaConfig.from_hf_dict(_hf_config(src)), llama_table),
    "clip_vision": SourceKind("clip_vision", lambda src, _s, _v: VisionConfig.from_hf_dict(_hf_config(src)),
                              clip_vision_table),
    "hipie": SourceKind("hipie", _hipie_config, lambda cfg: hipie_table(cfg.num_queries)),
    "segllm": SourceKind("segllm", lambda src, s, v: _segllm_config(src, s, v), segllm_table,
                         lambda s, cfg, progress: dn_resizer_arrays(s, cfg, SEGLLM_PREFIX, progress=progress)),
}


def _with_param_dtype(config: Any, dtype: str) -> Any:
    if isinstance(config, SegLLMConfig):  # the LLaVA half; HIPIE stays float32 as in the original's fp32 paths
        return dataclasses.replace(config, llm=dataclasses.replace(config.llm, param_dtype=dtype),
                                   vision=dataclasses.replace(config.vision, param_dtype=dtype))
    return dataclasses.replace(config, param_dtype=dtype)


def detect_kind(src: Path, source: TensorSource) -> str:
    """The source kind from ``config.json`` or, for a bare state dict, from its keys."""
    config = _hf_config(src) if src.is_dir() and (src / "config.json").exists() else {}
    model_type = config.get("model_type")
    if model_type == "llava" and config.get("segmentator") == "hipie":
        return "segllm"
    if model_type == "llama":
        return "llama"
    if model_type in ("clip", "clip_vision_model"):
        return "clip_vision"
    if model_type is None and any(k.startswith("detr.") for k in source):
        return "hipie"
    known = ", ".join(sorted(SOURCE_KINDS))
    raise CheckpointError(f"cannot tell what {src} holds (model_type={model_type!r}, first key "
                          f"{next(iter(source), None)!r}); pass --kind, one of: {known}.")


def convert_checkpoint(src: str | Path, dst: str | Path, *, kind: str | None = None,
                       param_dtype: str | None = None, vision_config: str | Path | None = None,
                       progress: bool = True, overwrite: bool = False) -> Path:
    """Converts SRC into the folder DST: a new or empty folder, or any folder with ``overwrite``
    (never SRC itself, inside it or around it); written aside and moved into place when complete.

    ``vision_config``: a CLIP ``config.json`` for a SegLLM release whose tower is not ViT-L/14
    (a release names its tower only as a hub id).
    """
    src, dst = Path(src), Path(dst)
    check_destination(dst, [src] + ([vision_config] if vision_config else []), overwrite)
    source = open_checkpoint(src)
    kind = kind or detect_kind(src, source)
    if kind not in SOURCE_KINDS:
        raise CheckpointError(f"unknown kind {kind!r}; known: {', '.join(sorted(SOURCE_KINDS))}.")
    spec = SOURCE_KINDS[kind]
    vision = VisionConfig.from_hf_dict(load_json(vision_config)) if vision_config else None
    config = spec.read_config(src, source, vision)
    if param_dtype:
        config = _with_param_dtype(config, param_dtype)
    model = checkpoint.build_model(spec.model_kind, config, abstract=True)
    log.info("converting %s (%s, %.1f MB) -> %s", src, kind, source.nbytes / 2**20, dst)
    arrays = convert(source, spec.table(config), flat_targets(model), progress=progress)
    training = spec.training_arrays(source, config, progress)
    with written_atomically(dst) as tmp:
        checkpoint.save(tmp, spec.model_kind, config, arrays, training_arrays=training)
        if src.is_dir():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
    return dst


def convert_training_init(llava: str | Path, clip: str | Path, hipie: str | Path, dst: str | Path, *,
                          seed: int = 0, progress: bool = True, overwrite: bool = False) -> Path:
    """SegLLM's starting point for training (architecture.md §T12) from its three sources, as one checkpoint.

    ``llava``: a LLaVA-1.5 folder (LLaMA + ``mm_projector``, 32000-token vocabulary, tokenizer);
    ``clip``: a CLIP ViT folder (``openai/clip-vit-large-patch14``); ``hipie``: ``r50_parts.pth``.
    SegLLM's 11 tokens are added to the tokenizer and their embedding / LM-head rows initialised as
    the original's transformers did; ``mask_enc_head`` and ``segmentator_predictor`` start from
    PyTorch's default Linear init (seeded). HIPIE's DN label encoder (``detr.resizer`` of
    ``r50_parts.pth``, training only) is kept in ``training_params/``.
    """
    from segllm_jax.tokenizer import SegTokenizer

    llava, clip, hipie, dst = Path(llava), Path(clip), Path(hipie), Path(dst)
    check_destination(dst, [llava, clip, hipie], overwrite)
    for path in (llava, clip, hipie):
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder.")
    llava_config = _hf_config(llava)
    tokenizer = SegTokenizer.from_pretrained(llava)
    base_vocab = int(llava_config["vocab_size"])
    sources = {"llava": open_checkpoint(llava), "clip": open_checkpoint(clip), "hipie": open_checkpoint(hipie)}
    vision = VisionConfig.from_hf_dict(load_json(clip / "config.json"))
    release_like = {**llava_config, "segmentator": "hipie", "vocab_size": tokenizer.vocab_size}
    custom_hipie = "hipie" in llava_config.get("segllm_jax", {})
    config = SegLLMConfig.from_release(release_like, vision,
                                       None if custom_hipie else _hipie_config(hipie, sources["hipie"], vision))
    model = checkpoint.build_model("segllm", config, abstract=True)
    targets = flat_targets(model)
    parts = {
        "llava": (llava_table(config, added_token_rows(tokenizer.vocab_size - base_vocab, seed)),
                  ("llm/", "mm_projector/")),
        "clip": (clip_vision_table(config.vision).under("", "vision_tower/"), ("vision_tower/",)),
        "hipie": (hipie_table(config.hipie.num_queries).under("", "segmentator/"), ("segmentator/",)),
    }
    arrays: dict[str, Any] = {}
    for name, (table, prefixes) in parts.items():
        wanted = {k: v for k, v in targets.items() if k.startswith(prefixes)}
        arrays.update(convert(sources[name], table, wanted, progress=progress))
    rngs = nnx.Rngs(seed)
    for name, head in (("mask_enc_head", box_encoder(config, rngs)), ("segmentator_predictor",
                                                                      seg_predictor(config, rngs))):
        arrays.update({f"{name}/{path}": v for path, v in checkpoint.flat_arrays(head).items()})
    training = dn_resizer_arrays(sources["hipie"], config, "", progress=progress)
    log.info("training init: %d new token rows, fresh mask_enc_head and segmentator_predictor",
             tokenizer.vocab_size - base_vocab)
    with written_atomically(dst) as tmp:
        checkpoint.save(tmp, "segllm", config, arrays, training_arrays=training)
        tokenizer.save(tmp)
    return dst
