"""Our checkpoint format: ``config.json`` (kind + config) and ``params/`` (orbax), and its one loader.

A converted or trained checkpoint folder looks like::

    DIR/config.json     {"format": "segllm-jax", "kind": "llama", "config": {...dataclass fields...}}
    DIR/params/         orbax PyTree checkpoint of the model's nnx.Param values (nested dict)
    DIR/training_params/  optional, same layout: weights only training uses (HIPIE's DN label
                        encoder ``detr.resizer`` at ``segmentator_dn_resizer/``); loading a model
                        for inference never reads it
    DIR/tokenizer*      tokenizer files, when the source had them

``load_model(DIR)`` rebuilds the model from the config and restores the parameters strictly:
missing, extra or mis-shaped entries are named in one :class:`CheckpointError`.
:func:`restore_sharded` is the trainer's way in: every array straight into its target sharding.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax import checkpoint_folder as folder_checks
from segllm_jax import schema
from segllm_jax.config import HipieConfig, LlamaConfig, ProjectorConfig, SegLLMConfig, VisionConfig
from segllm_jax.errors import CheckpointError, ConfigError
from segllm_jax.outputs import atomic_write_text

FORMAT = folder_checks.FORMAT
PARAMS = folder_checks.PARAMS
TRAINING_PARAMS = "training_params"


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """How to rebuild one kind of model from its config."""

    config_type: type
    build: Callable[[Any, nnx.Rngs], nnx.Module]


def _kinds() -> dict[str, ModelKind]:
    from segllm_jax.models.clip_vision import ClipVision
    from segllm_jax.models.hipie.model import Hipie
    from segllm_jax.models.llama import Llama
    from segllm_jax.models.projector import MlpProjector
    from segllm_jax.models.segllm import SegLLM

    return {
        "llama": ModelKind(LlamaConfig, lambda c, r: Llama(c, rngs=r)),
        "clip_vision": ModelKind(VisionConfig, lambda c, r: ClipVision(c, rngs=r)),
        "mlp_projector": ModelKind(ProjectorConfig, lambda c, r: MlpProjector(c, rngs=r)),
        "hipie": ModelKind(HipieConfig, lambda c, r: Hipie(c, rngs=r)),
        "segllm": ModelKind(SegLLMConfig, lambda c, r: SegLLM(c, rngs=r)),
    }


def model_kinds() -> dict[str, ModelKind]:
    return _kinds()


def build_model(kind: str, config: Any, *, abstract: bool = False, seed: int = 0) -> nnx.Module:
    """A model of ``kind`` with random weights (or shapes only, with ``abstract=True``: no memory)."""
    kinds = _kinds()
    if kind not in kinds:
        raise CheckpointError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(kinds))}.")
    make = lambda: kinds[kind].build(config, nnx.Rngs(seed))  # noqa: E731
    # one compiled initialiser instead of one small compilation per parameter
    return nnx.eval_shape(make) if abstract else nnx.jit(make)()


def config_from_dict(kind: str, fields: Mapping[str, Any]) -> Any:
    """The config of ``kind`` from its JSON fields, every field type-checked (:mod:`segllm_jax.schema`)."""
    if kind not in folder_checks.CONFIG_TYPES:
        raise CheckpointError(f"unknown model kind {kind!r}; known kinds: "
                              f"{', '.join(sorted(folder_checks.CONFIG_TYPES))}.")
    return schema.build(folder_checks.CONFIG_TYPES[kind], fields, f"{kind} config")


def flat_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    """'/'-joined path -> value of every ``nnx.Param`` of a concrete module (what :func:`save` takes)."""
    return {"/".join(map(str, path)): np.asarray(var[...])
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """'/'-joined path -> leaf of a nested dict (an orbax tree): the inverse of how :func:`save` nests
    parameter paths, so readers of a checkpoint item (``export``) see the names the model uses."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save(directory: str | Path, kind: str, config: Any, arrays: Mapping[str, np.ndarray], *,
         training_arrays: Mapping[str, np.ndarray] | None = None) -> Path:
    """Writes a checkpoint folder from '/'-joined parameter paths -> arrays (``training_arrays``, if
    any, to ``training_params/``)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params_dir = directory / PARAMS
    if params_dir.exists():
        raise CheckpointError(f"{params_dir} already exists; choose an empty output folder.")
    items = {PARAMS: arrays, TRAINING_PARAMS: training_arrays or {}}
    with ocp.PyTreeCheckpointer() as ckptr:
        for item, flat in items.items():
            if flat:
                ckptr.save(directory / item, _nest({k: np.asarray(v) for k, v in flat.items()}))
    meta = {"format": FORMAT, "kind": kind, "config": dataclasses.asdict(config)}
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> tuple[str, Any]:
    """(kind, config) of a checkpoint folder (checked by :mod:`segllm_jax.checkpoint_folder`)."""
    return folder_checks.read_config(directory)


def _drop_orphaned_reads() -> None:
    """Silences the reads a failed orbax call leaves behind (installed once, before the first read).

    When orbax gives up on a damaged store, tensorstore still finishes the reads it had started and hands
    each result to the asyncio loop orbax has already closed. Every one of them surfaces, after our
    one-sentence error, as an unraisable ``RuntimeError('Event loop is closed')`` printed to stderr as a
    bare traceback (hundreds for a truncated checkpoint). Nothing waits for those results and we cannot
    cancel them, so exactly that error is dropped; every other unraisable exception goes on as before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_orphaned_reads", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_orphaned_reads = True
    sys.unraisablehook = hook


def _damaged(folder: Path, error: Exception) -> CheckpointError:
    """An orbax / tensorstore failure on a folder that passed the cheap checks, as one sentence."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return CheckpointError(f"{folder} cannot be read; the parameters are damaged or truncated (convert or export "
                           f"the checkpoint again) ({type(error).__name__}: {detail}).")


def _stored(folder: Path) -> dict[str, Any]:
    """'/'-joined path -> orbax metadata (``.shape``, ``.dtype``) of every array under ``folder``."""
    import orbax.checkpoint as ocp

    folder_checks.check_params(folder.parent, folder.name)
    _drop_orphaned_reads()  # every read of a checkpoint starts here
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            return flatten_tree(ckptr.metadata(folder).item_metadata.tree)
    except Exception as e:  # orbax reports damage with many exception types
        raise _damaged(folder, e) from e


def _check_match(folder: Path, stored: Mapping[str, Any], want: Mapping[str, tuple[int, ...]]) -> None:
    """Raises one CheckpointError naming every unexpected, missing and mis-shaped entry."""
    extra, missing = sorted(set(stored) - set(want)), sorted(set(want) - set(stored))
    bad = sorted(f"{k}: stored {tuple(stored[k].shape)}, model needs {tuple(want[k])}"
                 for k in set(stored) & set(want) if tuple(stored[k].shape) != tuple(want[k]))
    if extra or missing or bad:
        parts = [f"{title} ({len(keys)}): {', '.join(keys)}" for title, keys in
                 (("unexpected", extra), ("missing", missing), ("mis-shaped", bad)) if keys]
        raise CheckpointError(f"{folder} does not match the model: " + "; ".join(parts) + ".")


def restore_arrays(directory: str | Path, module: nnx.Module) -> nnx.Module:
    """Restores ``params/`` into ``module`` (concrete or abstract), strictly."""
    import orbax.checkpoint as ocp

    params_dir = Path(directory).absolute() / PARAMS
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    want = {"/".join(map(str, p)): v for p, v in flat}
    _check_match(params_dir, _stored(params_dir), {k: v.shape for k, v in want.items()})
    target = _nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in want.items()})
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = flatten_tree(ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), target))))
    except Exception as e:  # a truncated data file surfaces only here (OUT_OF_RANGE, ...)
        raise _damaged(params_dir, e) from e
    for path, var in flat:
        var.set_value(jnp.asarray(restored["/".join(map(str, path))], dtype=var.get_value().dtype))
    graphdef, _ = nnx.split(module)
    return nnx.merge(graphdef, nnx.from_flat_state(flat), nnx.state(module, nnx.Not(nnx.Param)))


def restore_sharded(directory: str | Path, targets: Mapping[str, jax.ShapeDtypeStruct],
                    item: str = PARAMS) -> dict[str, jax.Array]:
    """``DIR/<item>`` (strictly: exactly the keys of ``targets``) as global arrays of each target's
    shape, dtype and sharding. Every process reads only the shards its devices hold (orbax
    ``ArrayRestoreArgs``), so no host ever holds a whole model, however large."""
    import orbax.checkpoint as ocp

    folder = Path(directory).absolute() / item
    _check_match(folder, _stored(folder), {k: t.shape for k, t in targets.items()})
    tree = _nest(dict(targets))
    args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                        tree)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            return flatten_tree(ckptr.restore(folder, args=ocp.args.PyTreeRestore(item=tree, restore_args=args)))
    except Exception as e:  # see restore_arrays
        raise _damaged(folder, e) from e


def _check_quantize(quantize: str | None, quantize_vision: bool) -> None:
    """Bad quantization options, refused before anything is read."""
    from segllm_jax.quantize import check_qtype

    if quantize is not None:
        check_qtype(quantize)
    elif quantize_vision:
        raise ConfigError("quantize_vision needs quantize='int8' or 'int4'.")


def load_model(directory: str | Path, *, quantize: str | None = None,
               quantize_vision: bool = False) -> tuple[str, Any, nnx.Module]:
    """(kind, config, model) of a segllm-jax checkpoint folder; ``quantize`` ("int8" / "int4") quantizes the
    LLM's weights (and the CLIP tower's, with ``quantize_vision``) through qwix (:mod:`segllm_jax.quantize`)."""
    from segllm_jax import quantize as Q

    _check_quantize(quantize, quantize_vision)
    kind, config = read_config(directory)
    if quantize is not None:
        config = Q.quantized_config(kind, config, vision=quantize_vision)
    try:
        model = build_model(kind, config, abstract=True)
    except (ValueError, TypeError, ZeroDivisionError) as e:  # a well-typed config with impossible sizes
        raise CheckpointError(f"{Path(directory) / 'config.json'} does not describe a model that can be built "
                              f"({type(e).__name__}: {str(e)[:160]}).") from None
    model = restore_arrays(directory, model)
    if quantize is not None:
        model = Q.quantize_model(kind, model, quantize, vision=quantize_vision)
    return kind, config, model


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint folder, loaded: the model plus its tokenizer (None if the folder has none)."""

    kind: str
    config: Any
    model: nnx.Module
    tokenizer: Any
    directory: Path


def load(directory: str | Path, *, quantize: str | None = None, quantize_vision: bool = False) -> Loaded:
    """``segllm_jax.load(DIR)``: model and tokenizer of a converted or trained checkpoint folder.

    A SegLLM folder must have its tokenizer files (checked before anything is loaded); other kinds
    may lack them (``tokenizer`` is then None). ``quantize="int8"`` or ``"int4"`` loads the LLM with
    weight-only quantized Linears (``quantize_vision=True``: the CLIP tower's too), activations in
    bfloat16 (:mod:`segllm_jax.quantize`); an unknown value raises :class:`ConfigError`."""
    from segllm_jax.tokenizer import SegTokenizer

    directory = Path(directory)
    _check_quantize(quantize, quantize_vision)
    kind, _ = read_config(directory)
    if kind == "segllm":
        folder_checks.check_tokenizer(directory)
    kind, config, model = load_model(directory, quantize=quantize, quantize_vision=quantize_vision)
    has_tokenizer = any((directory / f).is_file() for f in folder_checks.TOKENIZER_FILES)
    tokenizer = SegTokenizer.from_pretrained(directory) if has_tokenizer else None
    if tokenizer is not None and kind == "segllm":
        tokenizer.check_vocab_size(config.llm.vocab_size)
    return Loaded(kind, config, model, tokenizer, directory)
