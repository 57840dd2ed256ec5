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

from segllm_jax import checkpoint
from segllm_jax.config import LlamaConfig, VisionConfig, load_json
from segllm_jax.errors import CheckpointError
from segllm_jax_convert.clip import clip_vision_table
from segllm_jax_convert.engine import MappingTable, convert, flat_targets
from segllm_jax_convert.io import TensorSource, open_checkpoint
from segllm_jax_convert.llama import llama_table

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One convertible source: how to read its config and which table maps it."""

    model_kind: str
    read_config: Callable[[Path, TensorSource], Any]
    table: Callable[[Any], MappingTable]


def _hf_config(src: Path) -> dict:
    return load_json(src / "config.json") if src.is_dir() else {}


SOURCE_KINDS: dict[str, SourceKind] = {
    "llama": SourceKind("llama", lambda src, _: LlamaConfig.from_hf_dict(_hf_config(src)), llama_table),
    "clip_vision": SourceKind("clip_vision", lambda src, _: VisionConfig.from_hf_dict(_hf_config(src)),
                              clip_vision_table),
}


def detect_kind(src: Path, source: TensorSource) -> str:
    """The source kind from ``config.json`` or, for a bare state dict, from its keys."""
    model_type = _hf_config(src).get("model_type") if src.is_dir() and (src / "config.json").exists() else None
    if model_type == "llama":
        return "llama"
    if model_type in ("clip", "clip_vision_model"):
        return "clip_vision"
    known = ", ".join(sorted(SOURCE_KINDS))
    raise CheckpointError(f"cannot tell what {src} holds (model_type={model_type!r}, first key "
                          f"{next(iter(source), None)!r}); pass --kind, one of: {known}.")


def convert_checkpoint(src: str | Path, dst: str | Path, *, kind: str | None = None,
                       param_dtype: str | None = None, progress: bool = True) -> Path:
    """Converts SRC into the folder DST (created; must not hold a checkpoint already)."""
    src, dst = Path(src), Path(dst)
    if (dst / "params").exists():
        raise CheckpointError(f"{dst} already holds a checkpoint; choose an empty output folder.")
    source = open_checkpoint(src)
    kind = kind or detect_kind(src, source)
    if kind not in SOURCE_KINDS:
        raise CheckpointError(f"unknown kind {kind!r}; known: {', '.join(sorted(SOURCE_KINDS))}.")
    spec = SOURCE_KINDS[kind]
    config = spec.read_config(src, source)
    if param_dtype:
        config = dataclasses.replace(config, param_dtype=param_dtype)
    model = checkpoint.build_model(spec.model_kind, config, abstract=True)
    log.info("converting %s (%s, %.1f MB) -> %s", src, kind, source.nbytes / 2**20, dst)
    arrays = convert(source, spec.table(config), flat_targets(model), progress=progress)
    checkpoint.save(dst, spec.model_kind, config, arrays)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)
    return dst
