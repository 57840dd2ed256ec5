"""``segllm-jax export CKPT OUT``: a segllm-jax checkpoint back to the PyTorch release layout.

Why: weights trained here must go back to the PyTorch world (the original repository,
``transformers``, deployment stacks). The key names and layouts come from the converter's own
tables run backwards (:meth:`MappingTable.invert`), so ``convert`` after ``export`` gives every
parameter back bit for bit, and the two directions cannot drift apart.

Parts (``--part``):

* ``segllm`` (default): the released SegLLM folder: ``model-0000N-of-0000M.safetensors`` +
  ``model.safetensors.index.json``, ``config.json`` (``mm_*`` / ``segmentator`` fields, plus our
  ``segllm_jax`` entry describing the vision tower and HIPIE exactly), ``generation_config.json``
  and the tokenizer files;
* ``llm``: a plain ``transformers`` LLaMA folder (``LlamaForCausalLM.from_pretrained``);
* ``clip``: a ``CLIPVisionModel`` folder (the blocks SegLLM runs);
* ``hipie``: ``r50_parts.pth``, HIPIE's state dict saved with ``torch.save`` of plain tensors.

Source keys the converter ignores (with a reason) have no value here: ``like`` (a checkpoint of
the same kind, e.g. the release it was converted from) supplies them, otherwise the output's
``README.md`` lists them as absent. HIPIE's DN label encoder (``training_params/``) is exported too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from segllm_jax import checkpoint_folder
from segllm_jax.checkpoint import PARAMS, TRAINING_PARAMS, flatten_tree
from segllm_jax.config import LlamaConfig, SegLLMConfig, VisionConfig
from segllm_jax.errors import CheckpointError, InputError
from segllm_jax.models.segllm import DN_RESIZER
from segllm_jax.outputs import atomic_write_text, check_destination, written_atomically
from segllm_jax_convert.clip import clip_vision_table
from segllm_jax_convert.convert import TOKENIZER_FILES
from segllm_jax_convert.engine import MappingTable
from segllm_jax_convert.hipie import SEGLLM_PREFIX, hipie_table
from segllm_jax_convert.io import open_checkpoint
from segllm_jax_convert.llama import llama_table
from segllm_jax_convert.segllm import dn_resizer_training_table, segllm_table

log = logging.getLogger(__name__)

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


# ---- config.json of each part (the inverse of config.py's from_hf_dict / from_release) -----------------


def llama_hf_config(c: LlamaConfig, dtype: str) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "torch_dtype": dtype}


def clip_hf_config(c: VisionConfig, dtype: str) -> dict[str, Any]:
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "image_size": c.image_size, "patch_size": c.patch_size,
            "num_channels": 3, "layer_norm_eps": c.layer_norm_eps, "hidden_act": c.hidden_act, "torch_dtype": dtype}


def release_config(c: SegLLMConfig, dtype: str) -> dict[str, Any]:
    """The release's ``config.json``; the ``segllm_jax`` entry states the vision tower and HIPIE exactly
    (the release names its tower only as a hub id), so ``convert`` rebuilds the same model."""
    vision = {k: v for k, v in clip_hf_config(c.vision, dtype).items() if k not in ("architectures", "model_type")}
    return {**llama_hf_config(c.llm, dtype), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
            "mm_hidden_size": c.vision.hidden_size, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": c.vision.select_layer, "mm_vision_select_feature": c.vision.select_feature,
            "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "mm_use_bbox_encode": True, "use_mm_proj": True,
            "image_aspect_ratio": "square", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
            "segmentator": "hipie", "use_cache": True,
            "segllm_jax": {"vision": vision, "hipie": dataclasses.asdict(c.hipie),
                           "hipie_image_size": c.hipie_image_size}}


# ---- what each part writes ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
    """One exportable part: which of our parameters, through which table, into which files."""

    subtree: str  # our parameter paths under this prefix ("" = all), stripped before the table
    table: Callable[[SegLLMConfig], MappingTable]
    training_prefix: str | None  # where DN label-encoder keys go (None: the part has none)
    config: Callable[[SegLLMConfig, str], dict[str, Any]] | None  # config.json (None: a bare .pth)
    tokenizer: bool


PARTS: dict[str, Part] = {
    "segllm": Part("", segllm_table, SEGLLM_PREFIX, release_config, True),
    "llm": Part("llm/", lambda c: llama_table(c.llm), None, lambda c, d: llama_hf_config(c.llm, d), True),
    "clip": Part("vision_tower/", lambda c: clip_vision_table(c.vision), None,
                 lambda c, d: clip_hf_config(c.vision, d), False),
    "hipie": Part("segmentator/", lambda c: hipie_table(c.hipie.num_queries), "", None, False),
}


def read_item(ckpt: Path, item: str) -> dict[str, np.ndarray]:
    """'/'-joined path -> array of ``ckpt/item`` (orbax), as stored (dtype kept)."""
    import orbax.checkpoint as ocp

    folder = ckpt.absolute() / item
    checkpoint_folder.check_params(ckpt, item)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.restore(folder)
    except Exception as e:  # noqa: BLE001 - orbax reports damage with many exception types
        raise CheckpointError(f"{folder} cannot be read; the parameters are damaged or truncated "
                              f"({type(e).__name__}).") from None
    return {k: np.asarray(v) for k, v in flatten_tree(tree).items()}


def state_dict(ckpt: str | Path, part: str = "segllm") -> tuple[SegLLMConfig, dict[str, np.ndarray], MappingTable]:
    """(config, PyTorch-named tensors, the part's table) of a segllm-jax SegLLM checkpoint, dtypes as stored."""
    ckpt = Path(ckpt)
    _, config = checkpoint_folder.inspect(ckpt, kinds=("segllm",))
    spec = PARTS[part]
    params = {k[len(spec.subtree):]: v for k, v in read_item(ckpt, PARAMS).items() if k.startswith(spec.subtree)}
    table = spec.table(config)
    tensors = table.invert(params)
    if spec.training_prefix is not None and (ckpt / TRAINING_PARAMS).is_dir():
        training = {k: v for k, v in read_item(ckpt, TRAINING_PARAMS).items() if k.startswith(DN_RESIZER + "/")}
        tensors.update(dn_resizer_training_table(spec.training_prefix).invert(training))
    return config, tensors, table


def _restore_ignored(like: Path, table: MappingTable, tensors: dict[str, np.ndarray]) -> list[str]:
    """Adds ``like``'s tensors for the keys ``table`` ignores (and we do not hold); returns their names."""
    source = open_checkpoint(like)
    unknown = [k for k in source if table.route(k) == (None, None, None)]
    if unknown:
        raise InputError(f"--like {like} is not a checkpoint of the exported kind (e.g. key {unknown[0]!r} "
                         "is unknown to its table); pass the checkpoint this one was converted from.")
    restored = [k for k in source if k not in tensors and table.route(k)[2] is not None]
    for key in restored:
        tensors[key] = np.asarray(source.load(key))
    return restored


def _cast(tensors: Mapping[str, np.ndarray], dtype: np.dtype | None) -> dict[str, np.ndarray]:
    """Floating tensors to ``dtype`` (None: as stored); integer buffers keep theirs."""
    def floating(a: np.ndarray) -> bool:
        return np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16
    return {k: np.ascontiguousarray(v.astype(dtype) if dtype is not None and floating(v) else v)
            for k, v in tensors.items()}


def write_shards(folder: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[str]:
    """``model-0000N-of-0000M.safetensors`` (each at most ``max_shard_bytes`` unless one tensor is larger)
    and ``model.safetensors.index.json``, as ``save_pretrained`` writes them; returns the shard names."""
    from safetensors.numpy import save_file

    groups: list[list[str]] = [[]]
    size = 0
    for key, array in tensors.items():
        if groups[-1] and size + array.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += array.nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, keys in zip(names, groups, strict=True):
        save_file({k: tensors[k] for k in keys}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    atomic_write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return names


def write_torch_state_dict(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """A plain ``{name: tensor}`` dict via ``torch.save``: loads with ``torch.load(weights_only=True)``."""
    try:
        import torch
    except ImportError:
        raise InputError("--part hipie writes a PyTorch .pth file and needs `pip install torch`.") from None

    def to_torch(a: np.ndarray) -> "torch.Tensor":
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())

    torch.save({k: to_torch(v) for k, v in tensors.items()}, path)


def _readme(ckpt: Path, part: str, dtype: str, table: MappingTable, files: list[str], like: Path | None,
            restored: list[str]) -> str:
    lines = [f"# segllm-jax export ({part})", "", f"Exported from `{ckpt}` by `segllm-jax export --part {part}`, "
             f"floating tensors as {dtype}.", "", "Files: " + ", ".join(f"`{f}`" for f in files) + ".", ""]
    if like is not None:
        lines += [f"{len(restored)} tensors the converter does not read were copied from `{like}` (`--like`).", ""]
    else:
        lines += ["## Absent keys", "",
                  "The converter ignores these source keys (inference never reads them), so this export has no "
                  "values for them; pass `--like SRC` (the checkpoint this one was converted from) to copy them:",
                  "", "| key pattern | why the converter ignores it |", "|---|---|"]
        lines += [f"| `{pattern}` | {reason} |" for pattern, reason in table.ignore]
    return "\n".join(lines) + "\n"


def check_output(out: str | Path, sources: list[str | Path]) -> Path:
    """OUT must not exist (export never writes into or over a folder) nor overlap a source."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise InputError(f"the output folder {out} exists; export writes a new folder only, so choose another "
                         "name or remove it.")
    return check_destination(out, sources)


def export_checkpoint(ckpt: str | Path, out: str | Path, *, part: str = "segllm", dtype: str | None = None,
                      like: str | Path | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes ``part`` of the segllm-jax checkpoint ``ckpt`` to the new folder ``out`` (written as a hidden
    sibling and renamed when complete, so an interrupted export leaves nothing under ``out``)."""
    ckpt, out = Path(ckpt), Path(out)
    if part not in PARTS:
        raise InputError(f"unknown --part {part!r}; choose one of {', '.join(PARTS)}.")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"unknown --dtype {dtype!r}; choose float32 or bfloat16.")
    like = Path(like) if like is not None else None
    check_output(out, [ckpt] + ([like] if like else []))
    spec = PARTS[part]
    config, tensors, table = state_dict(ckpt, part)
    restored = _restore_ignored(like, table, tensors) if like is not None else []
    tensors = _cast(tensors, DTYPES[dtype] if dtype else None)
    stored = dtype or ("bfloat16" if any(v.dtype == ml_dtypes.bfloat16 for v in tensors.values()) else "float32")
    log.info("exporting %s (%s, %d tensors) -> %s", ckpt, part, len(tensors), out)
    with written_atomically(out) as tmp:
        if spec.config is None:
            write_torch_state_dict(tmp / "r50_parts.pth", tensors)
            files = ["r50_parts.pth"]
        else:
            files = write_shards(tmp, tensors, max_shard_bytes) + ["model.safetensors.index.json", "config.json"]
            fields = spec.config(config, stored)
            if like is not None and (like / "config.json").is_file():  # keep the original's other fields
                fields = {**json.loads((like / "config.json").read_text()), **fields}
            atomic_write_text(tmp / "config.json", json.dumps(fields, indent=2) + "\n")
        if spec.tokenizer:
            files += _copy_tokenizer(ckpt, tmp)
        atomic_write_text(tmp / "README.md", _readme(ckpt, part, stored, table, files, like, restored))
    return out


def _copy_tokenizer(ckpt: Path, dst: Path) -> list[str]:
    """The tokenizer files and ``generation_config.json`` (the original's defaults when the checkpoint has none)."""
    copied = [name for name in TOKENIZER_FILES if (ckpt / name).is_file()]  # the files `convert` keeps
    for name in copied:
        shutil.copy2(ckpt / name, dst / name)
    if "generation_config.json" not in copied:
        atomic_write_text(dst / "generation_config.json", json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
        copied.append("generation_config.json")
    return copied


