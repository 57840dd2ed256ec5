"""LoRA / QLoRA fine-tuning: adapters on chosen Linear layers, a frozen (optionally quantized) base.

* :func:`add_adapters` swaps every ``Linear`` whose module path matches ``TrainConfig.lora.targets`` for a
  :class:`LoraLinear` holding the same kernel and bias plus ``lora_a [in, r]`` (he-uniform) and
  ``lora_b [r, out]`` (zeros, so a fresh adapter is the identity), both ``nnx.LoRAParam`` with logical axes
  derived from the kernel's, so they shard, checkpoint and flatten like every other parameter
  (``.../q_proj/lora_a``). The adapter computes ``x @ W + (alpha / r) * (drop(x) @ A) @ B``: no merged
  ``[in, out]`` weight exists in training.
* :func:`is_trainable_lora`: only adapters and the ``lora.train`` patterns (minus architecture.md §T12's frozen
  set) train; everything else goes to ``TrainState.frozen`` (no gradient, no moments).
* QLoRA (``base_weights_qtype`` int8 / nf4): the adapted layers' frozen kernels are stored as qwix
  ``QArray`` (int8 per output channel; nf4 in blocks of 64 inputs per output channel) and dequantized
  on the fly. The quantized base is derived deterministically from the init weights, so LoRA checkpoints
  leave it out and a resume rebuilds it (:func:`quantize_frozen`).
* :func:`merge` folds adapters into plain kernels (``dequant(W) + (alpha / r) A @ B``): the result is an
  ordinary parameter dict that ``export_model`` / ``segllm-jax merge-lora`` write as a model folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.errors import ConfigError
from segllm_jax.models.layers import Linear
from segllm_jax.train.config import LoraConfig

LORA_A, LORA_B = "lora_a", "lora_b"
NF4_BLOCK = 64  # nf4 scales: one per 64 input rows of each output column (QLoRA's block size)


class LoraDropoutKey(nnx.Variable):
    """The step's dropout key of one adapter (set inside the traced step only; never stored)."""


class LoraLinear(nnx.Module):
    """A :class:`~segllm_jax.models.layers.Linear` plus a low-rank adapter (same ``kernel``/``bias`` paths)."""

    def __init__(self, base: Linear, cfg: LoraConfig, key: jax.Array):
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        d_in, d_out = base.kernel.shape
        in_axis, out_axis = base.kernel.get_metadata().get("logical_axes") or (None, None)
        pdt = base.kernel.dtype
        self.lora_a = nnx.LoRAParam(nnx.initializers.he_uniform()(key, (d_in, cfg.rank), pdt),
                                    logical_axes=(in_axis, None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((cfg.rank, d_out), pdt), logical_axes=(None, out_axis))
        self.scale = cfg.scale
        self.dropout = cfg.dropout
        self.dropout_key = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        x = x.astype(dtype)
        y = jnp.dot(x, base_kernel(self.kernel.get_value()).astype(dtype), preferred_element_type=jnp.float32)
        h = x
        if self.dropout and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key.get_value(), 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dtype)
        ha = jnp.dot(h, self.lora_a[...].astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
        y = y + self.scale * jnp.dot(ha, self.lora_b[...].astype(dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


# ---------------------------------------------------------------------------------------------
# which modules, which parameters


def _linear_paths(model: nnx.Module) -> list[str]:
    return ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, (Linear, LoraLinear))]


def target_paths(model: nnx.Module, cfg: LoraConfig) -> list[str]:
    """Module paths of the Linear layers ``cfg.targets`` selects; a pattern that selects none is a ConfigError."""
    paths = _linear_paths(model)
    chosen = set()
    for pattern in cfg.targets:
        hits = [p for p in paths if re.fullmatch(pattern, p)]
        if not hits:
            sample = ", ".join(paths[:: max(1, len(paths) // 12)][:12])
            raise ConfigError(f"lora target pattern {pattern!r} matches no Linear layer of the model "
                              f"(re.fullmatch on module paths such as: {sample}).")
        chosen.update(hits)
    return sorted(chosen)


def add_adapters(model: nnx.Module, cfg: LoraConfig, seed: int) -> nnx.Module:
    """Replaces the targeted ``Linear`` layers of ``model`` by :class:`LoraLinear` (in place; returns it)."""
    for i, path in enumerate(target_paths(model, cfg)):
        *parents, name = path.split("/")
        owner = model
        for part in parents:
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        lora = LoraLinear(owner[int(name)] if name.isdigit() else getattr(owner, name), cfg, key)
        if name.isdigit():
            owner[int(name)] = lora
        else:
            setattr(owner, name, lora)
    return model


def is_adapter(path: str) -> bool:
    return path.endswith("/" + LORA_A) or path.endswith("/" + LORA_B)


def is_trainable_lora(path: str, cfg: LoraConfig, frozen_rule) -> bool:
    """Adapters, and the ``cfg.train`` parameters that ``frozen_rule(path)`` (architecture.md §T12) lets train."""
    return is_adapter(path) or (any(re.search(p, path) for p in cfg.train) and frozen_rule(path))


def adapted_kernels(keys: Sequence[str]) -> list[str]:
    """Kernel paths of the adapted layers (those that have a ``lora_a`` next to them)."""
    owners = {k[: -len(LORA_A) - 1] for k in keys if k.endswith("/" + LORA_A)}
    return sorted(o + "/kernel" for o in owners)


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """One dropout key per adapter for this step (inside the traced step)."""
    for i, (_, m) in enumerate((p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)):
        m.dropout_key = LoraDropoutKey(jax.random.fold_in(key, i))


# ---------------------------------------------------------------------------------------------
# quantized base (qwix)


def quantize_kernel(kernel: jax.Array, qtype: str):
    """A frozen kernel ``[in, out]`` as a qwix ``QArray``: int8 per output channel, nf4 per 64-input block."""
    import qwix

    tiled = {0: NF4_BLOCK} if qtype == "nf4" and kernel.shape[0] % NF4_BLOCK == 0 else None
    return qwix.quantize(kernel, "nf4" if qtype == "nf4" else jnp.int8, channelwise_axes=(1,), tiled_axes=tiled)


def base_kernel(value) -> jax.Array:
    """A kernel's value for compute: dequantized if it is a ``QArray``."""
    import qwix

    return qwix.dequantize(value) if isinstance(value, qwix.QArray) else value


def quantize_frozen(frozen: Mapping[str, Any], keys: Sequence[str], qtype: str) -> dict[str, Any]:
    """``frozen`` with the adapted layers' kernels quantized to ``qtype`` (``"none"``: unchanged)."""
    if qtype == "none":
        return dict(frozen)
    targets = set(adapted_kernels(keys))
    return {k: quantize_kernel(v, qtype) if k in targets else v for k, v in frozen.items()}


# ---------------------------------------------------------------------------------------------
# merging


def merge(values: Mapping[str, Any], scale: float) -> dict[str, jax.Array]:
    """Plain parameters: every adapted kernel becomes ``dequant(W) + scale * A @ B`` (float32), adapters dropped."""
    out = {k: v for k, v in values.items() if not is_adapter(k)}
    for kernel in adapted_kernels(list(values)):
        owner = kernel[: -len("/kernel")]
        a = jnp.asarray(values[f"{owner}/{LORA_A}"], jnp.float32)
        b = jnp.asarray(values[f"{owner}/{LORA_B}"], jnp.float32)
        w = jnp.asarray(base_kernel(values[kernel]), jnp.float32)
        out[kernel] = w + scale * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)
    return out


# ---------------------------------------------------------------------------------------------
# adapters on disk, and merging them into a model folder

ADAPTERS_FILE, LORA_JSON = "adapters.npz", "lora.json"


def write_adapters(directory: Path, params: Mapping[str, Any], cfg) -> Path:
    """``directory/adapters.npz`` (the run's trained parameters: adapters and ``lora.train``) and
    ``lora.json`` (the LoRA settings and the base they apply to, ``init_checkpoint``)."""
    import dataclasses
    import json

    from segllm_jax.outputs import written_atomically

    with written_atomically(directory) as tmp:
        np.savez(tmp / ADAPTERS_FILE, **{k.replace("/", "."): np.asarray(v) for k, v in params.items()})
        meta = {"lora": dataclasses.asdict(cfg.lora), "base_weights_qtype": cfg.base_weights_qtype,
                "init_checkpoint": None if cfg.init_checkpoint is None else str(Path(cfg.init_checkpoint).absolute())}
        (tmp / LORA_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def merge_to_folder(checkpoint: str | Path, out: str | Path, base: str | Path | None = None,
                    overwrite: bool = False) -> Path:
    """``segllm-jax merge-lora``: a plain model folder (what ``segllm_jax.load``, ``chat`` and ``export`` read)
    from a LoRA run (``RUN/adapters``) or an adapters folder, and the base model folder (``base``, default the
    run's ``init_checkpoint``). A QLoRA run's base kernels are quantized as in training before merging."""
    import json

    from segllm_jax import checkpoint as ckpt_lib
    from segllm_jax.errors import InputError
    from segllm_jax.outputs import check_destination, written_atomically

    folder = Path(checkpoint)
    folder = folder / "adapters" if (folder / "adapters" / LORA_JSON).is_file() else folder
    if not (folder / LORA_JSON).is_file():
        raise InputError(f"{checkpoint} is neither a LoRA run folder (with adapters/) nor an adapters folder "
                         f"(with {LORA_JSON} and {ADAPTERS_FILE}).")
    meta = json.loads((folder / LORA_JSON).read_text())
    base = base or meta["init_checkpoint"]
    if base is None:
        raise InputError(f"{folder / LORA_JSON} records no base model (the run started from a random init); "
                         "pass --base MODEL_FOLDER.")
    out = check_destination(out, [folder, base], overwrite)
    lora_cfg = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["lora"].items()})
    loaded = ckpt_lib.load(base)
    values = {k: jnp.asarray(v, jnp.float32) for k, v in ckpt_lib.flat_arrays(loaded.model).items()}
    with np.load(folder / ADAPTERS_FILE) as npz:
        trained = {k.replace(".", "/"): npz[k] for k in npz.files}
    unknown = sorted(k for k in trained if not is_adapter(k) and k not in values)
    if unknown:
        raise InputError(f"the adapters do not fit the base {base}: it has no {', '.join(unknown[:5])}.")
    frozen = quantize_frozen({k: v for k, v in values.items() if k not in trained}, list(trained),
                             meta["base_weights_qtype"])  # the base as training saw it
    values = {**frozen, **{k: jnp.asarray(v) for k, v in trained.items()}}
    merged = merge(values, lora_cfg.scale)
    dtype = jnp.dtype(loaded.config.llm.param_dtype)
    arrays = {k: np.asarray(jnp.asarray(v, dtype)) for k, v in merged.items()}
    with written_atomically(out) as tmp:
        ckpt_lib.save(tmp, loaded.kind, loaded.config, arrays)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save(tmp)
    return out
