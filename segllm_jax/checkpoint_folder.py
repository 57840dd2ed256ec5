"""A checkpoint folder, checked before any model library sees it.

Why: orbax, ``json`` and ``transformers`` report a damaged folder as ``OUT_OF_RANGE``,
``JSONDecodeError`` or ``AttributeError`` tracebacks that do not say which file is wrong or what to
do. Everything here is cheap (no JAX, no orbax import) so the CLI runs it before loading anything
heavy: the folder itself, ``config.json`` (JSON, format, kind, every config field's type), the
parameter tree's files and the tokenizer files. Each failure is one
:class:`~segllm_jax.errors.CheckpointError` sentence naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from segllm_jax import schema
from segllm_jax.config import HipieConfig, LlamaConfig, ProjectorConfig, SegLLMConfig, VisionConfig
from segllm_jax.errors import CheckpointError

FORMAT = "segllm-jax"
PARAMS = "params"
CONFIG_TYPES: dict[str, type] = {"llama": LlamaConfig, "clip_vision": VisionConfig, "mlp_projector": ProjectorConfig,
                                 "hipie": HipieConfig, "segllm": SegLLMConfig}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # either one is enough to load the tokenizer
# files orbax writes into every PyTree checkpoint folder (the OCDBT manifest and the tree's metadata)
ORBAX_FILES = ("_METADATA", "manifest.ocdbt")

_WHAT_TO_DO = "pass a folder written by `segllm-jax convert` or `segllm-jax train`"


def check_folder(directory: str | os.PathLike) -> Path:
    """``directory`` exists, is a folder and can be listed."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; {_WHAT_TO_DO}.")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder; {_WHAT_TO_DO}.")
    try:
        os.listdir(path)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}).") from None
    return path


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path.parent} is not a segllm-jax checkpoint (no config.json); "
                              "convert PyTorch weights with `segllm-jax convert SRC DST` first.")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}).") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; the checkpoint is damaged.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the checkpoint is "
                              "damaged.") from None


def read_config(directory: str | os.PathLike, kinds: Iterable[str] | None = None) -> tuple[str, Any]:
    """(kind, config) from ``DIR/config.json``, every field checked; ``kinds`` limits the accepted kinds."""
    path = check_folder(directory) / "config.json"
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not a {type(meta).__name__}; the checkpoint is "
                              "damaged.")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a segllm-jax config (it may be a PyTorch/HF checkpoint: "
                              "convert it with `segllm-jax convert`).")
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in CONFIG_TYPES:
        raise CheckpointError(f"{path} has kind {kind!r}; expected one of {', '.join(sorted(CONFIG_TYPES))}.")
    if kinds is not None and kind not in kinds:
        raise CheckpointError(f"{path.parent} holds a {kind} model; this command needs a "
                              f"{' or '.join(sorted(kinds))} checkpoint.")
    if "config" not in meta:
        raise CheckpointError(f"{path} lacks the field 'config'; the checkpoint is damaged.")
    return kind, schema.build(CONFIG_TYPES[kind], meta["config"], f"{path}: config")


def check_params(directory: str | os.PathLike, item: str = PARAMS) -> Path:
    """``DIR/<item>`` looks like a complete orbax tree: its folder, metadata and data files, none empty.

    Truncation inside a data file is only visible to orbax; :mod:`segllm_jax.checkpoint` turns
    that failure into a sentence too.
    """
    folder = Path(directory) / item
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing; the checkpoint folder is incomplete (convert or export "
                              "it again).")
    absent = [name for name in ORBAX_FILES if not (folder / name).is_file()]
    if absent:
        raise CheckpointError(f"{folder} lacks {', '.join(absent)}; the parameters are incomplete (convert or "
                              "export the checkpoint again).")
    empty = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.stat().st_size == 0
                   and p.name != "commit_success.txt")
    if empty:
        raise CheckpointError(f"{folder} holds empty files ({', '.join(empty[:3])}); the parameters are damaged "
                              "(convert or export the checkpoint again).")
    try:
        json.loads((folder / "_METADATA").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{folder / '_METADATA'} is not readable JSON; the parameters are damaged "
                              "(convert or export the checkpoint again).") from None
    return folder


def check_tokenizer(directory: str | os.PathLike) -> None:
    """The folder has tokenizer files (a SegLLM cannot read or write text without them)."""
    folder = Path(directory)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy them "
                              "from the checkpoint it was converted from.")


def inspect(directory: str | os.PathLike, *, kinds: Iterable[str] | None = None,
            tokenizer: bool = False) -> tuple[str, Any]:
    """Every cheap check at once: (kind, config) of a folder that should load, or one sentence why not."""
    kind, config = read_config(directory, kinds)
    check_params(directory)
    if tokenizer:
        check_tokenizer(directory)
    return kind, config
