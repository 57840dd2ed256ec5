"""LoRA / QLoRA fine-tuning through qwix: adapters on chosen Linear layers, a frozen (optionally quantized) base.

What qwix does (``qwix.LoraProvider`` / ``qwix.LoraRule``, qwix 0.1.8):

* the adapters: one ``LoraRule(module_path=pattern, rank, alpha, dropout)`` per ``TrainConfig.lora.targets``
  pattern; on a targeted Linear's first call qwix creates ``kernel_lora_a [in, r]`` (he-uniform) and
  ``kernel_lora_b [r, out]`` (zeros, so a fresh adapter is the identity) as ``nnx.LoRAParam`` next to the
  kernel, and every call returns ``x @ W + (alpha / r) * (dropout(x) @ A) @ B`` (no merged ``[in, out]`` weight
  exists in training). The adapter path computes in float32 (the adapters' dtype), the base in the compute dtype.
* QLoRA (``base_weights_qtype`` int8 / nf4): the same rule with ``weight_qtype`` (and ``tile_size``, from
  ``segllm_jax.quantize.QTYPE_TABLE``) makes qwix's PTQ half replace the frozen kernel by a ``QArray`` on that
  first call (``kernel/array/qvalue`` + ``kernel/array/scale``: int8 per output channel; nf4 per 64 inputs of
  each output channel where the input width is a larger multiple of 64) and run its matmuls on it.
* dropout: qwix draws the masks from the layer's ``qwix_rngs`` ``dropout`` stream.

What we still do, and why:

* applying it (:func:`add_adapters`): per targeted Linear through ``segllm_jax.quantize.apply_to_linears``,
  as inference quantization does, since SegLLM has many entry points (``run_llm``, ``image_embeds``,
  ``seg_prompts``, ...) and qwix intercepts one method of the model it is given. That helper runs qwix's
  first call under the layer's path in the whole model, so the rules' ``module_path`` are the targets as
  written, and in the parameter dtype, so a QLoRA base is quantized from the float32 master weights and the
  adapters are float32 whatever the compute dtype. A pattern that matches no Linear is our ConfigError
  (:func:`target_paths`, before qwix runs, naming paths that exist).
* logical axes: qwix copies the kernel's metadata (``logical_axes=(in, out)``) to both adapters; we set
  ``(in, None)`` on ``A`` and ``(None, out)`` on ``B``, so they shard like their kernel's rows / columns. The
  quantized values and scales keep the kernel's axes (a scale's size-1 row stays replicated).
* dropout keys (:func:`set_dropout_rngs`): qwix leaves ``qwix_rngs`` unset after the first call; the traced
  step gives every adapted layer an ``nnx.Rngs(dropout=...)`` folded from the step's key, so the masks depend
  on the step only and a resumed run draws the same ones.
* what trains (:func:`is_trainable_lora`): adapters and the ``lora.train`` patterns (minus architecture.md
  §T12's frozen set, and never a quantized kernel); everything else goes to ``TrainState.frozen``.
* a bfloat16 base (``base_weights_qtype="bf16"``, :func:`store_frozen`): qwix has nothing for a plain base in
  another dtype; we store every frozen float leaf in bfloat16 (adapters, trained heads and Adam moments stay
  float32). The Linears cast weights to the compute dtype anyway, so with bf16 compute the forward is the same.
* resume: LoRA checkpoints leave the frozen base out; it is rebuilt deterministically from the init weights
  (qwix quantizes them the same way again).
* merging (:func:`merge`; qwix has none): ``dequant(W) + (alpha / r) A @ B`` per adapted kernel, an ordinary
  parameter dict that ``export_model`` / ``segllm-jax merge-lora`` write as a model folder.
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

LORA_A, LORA_B = "kernel_lora_a", "kernel_lora_b"  # qwix's names: the kernel's name + "_lora_a" / "_lora_b"
QVALUE, QSCALE = "kernel/array/qvalue", "kernel/array/scale"  # a QLoRA kernel (qwix WithAux -> QArray fields)


# ---------------------------------------------------------------------------------------------
# which modules, which parameters


def _linear_paths(model: nnx.Module) -> list[str]:
    return ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]


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


def _providers(cfg: LoraConfig, qtype: str):
    """``linear -> qwix.LoraProvider``: one rule per target pattern; QLoRA rules quantize the kernel too (their
    tiling depends on the input width, so there is one provider per width)."""
    import qwix

    from segllm_jax.quantize import weight_rule_fields

    cache: dict[int, Any] = {}

    def provider_for(linear: Linear):
        d_in = linear.kernel.shape[0]
        if d_in not in cache:
            base = weight_rule_fields(qtype, d_in) if qtype not in ("none", "bf16") else {}
            cache[d_in] = qwix.LoraProvider([qwix.LoraRule(module_path=pattern, rank=cfg.rank, alpha=cfg.alpha,
                                                           dropout=cfg.dropout, **base) for pattern in cfg.targets])
        return cache[d_in]

    return provider_for


def add_adapters(model: nnx.Module, cfg: LoraConfig, qtype: str, seed: int) -> nnx.Module:
    """qwix LoRA (and, for ``qtype`` int8 / nf4, a quantized kernel) on the targeted Linears of ``model``, in place."""
    from segllm_jax.quantize import apply_to_linears

    def rngs_for(i: int) -> nnx.Rngs:  # the i-th adapter's init (qwix's first call also draws a dropout mask)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        return nnx.Rngs(params=key, dropout=key)

    paths = apply_to_linears(model, _providers(cfg, qtype), target_paths(model, cfg), rngs_for=rngs_for,
                             init_in_param_dtype=True)
    for path in paths:  # the adapters shard like the kernel's rows (A) and columns (B)
        layer = _module(model, path)
        in_axis, out_axis = _kernel_axes(layer)
        getattr(layer, LORA_A).set_metadata("logical_axes", (in_axis, None))
        getattr(layer, LORA_B).set_metadata("logical_axes", (None, out_axis))
    return model


def _module(model: nnx.Module, path: str) -> nnx.Module:
    for part in path.split("/"):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _kernel_axes(layer: Linear) -> tuple:
    kernel = layer.kernel
    if not isinstance(kernel, nnx.Variable):  # QLoRA: qwix's WithAux, whose values carry the kernel's metadata
        kernel = kernel.array.qvalue
    return kernel.get_metadata().get("logical_axes") or (None, None)


def adapted_layers(model: nnx.Module) -> list[nnx.Module]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and hasattr(m, LORA_A)]


def is_adapter(path: str) -> bool:
    return path.endswith("/" + LORA_A) or path.endswith("/" + LORA_B)


def is_quantized(path: str) -> bool:
    return path.endswith("/" + QVALUE) or path.endswith("/" + QSCALE)


def is_trainable_lora(path: str, cfg: LoraConfig, frozen_rule) -> bool:
    """Adapters, and the ``cfg.train`` parameters that ``frozen_rule(path)`` (architecture.md §T12) lets train
    (a QLoRA kernel never: it is integer values)."""
    return is_adapter(path) or (not is_quantized(path) and any(re.search(p, path) for p in cfg.train)
                                and frozen_rule(path))


def adapted_kernels(keys: Sequence[str]) -> list[str]:
    """Kernel paths (as in a plain model) of the adapted layers (those that have a ``kernel_lora_a``)."""
    owners = {k[: -len(LORA_A) - 1] for k in keys if k.endswith("/" + LORA_A)}
    return sorted(o + "/kernel" for o in owners)


def plain_key(key: str) -> str | None:
    """Where a training parameter comes from in a plain checkpoint: a QLoRA kernel's values from the kernel
    (``.../kernel/array/qvalue`` -> ``.../kernel``); adapters and quantization scales from nowhere (None)."""
    if is_adapter(key) or key.endswith("/" + QSCALE):
        return None
    return key[: -len(QVALUE)] + "kernel" if key.endswith("/" + QVALUE) else key


def set_dropout_rngs(model: nnx.Module, key: jax.Array) -> None:
    """The step's dropout stream of every adapter (inside the traced step): qwix reads ``qwix_rngs``."""
    for i, layer in enumerate(adapted_layers(model)):
        layer.qwix_rngs = nnx.data(nnx.Rngs(dropout=jax.random.fold_in(key, i)))


def store_frozen(frozen: Mapping[str, Any], qtype: str) -> dict[str, Any]:
    """The frozen leaves as a ``qtype`` run stores them: ``"bf16"`` casts every float leaf to bfloat16; int8 / nf4
    kernels are already quantized by qwix and everything else stays as it is."""
    if qtype != "bf16":
        return dict(frozen)
    return {k: v.astype(jnp.bfloat16) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in frozen.items()}


# ---------------------------------------------------------------------------------------------
# merging


def base_kernel(values: Mapping[str, Any], kernel: str, qtype: str) -> jax.Array:
    """The float32 value of a (possibly QLoRA-quantized) kernel of ``values``, as the forward sees it."""
    import qwix

    from segllm_jax.quantize import QTYPE_TABLE

    owner = kernel[: -len("kernel")]
    if owner + QVALUE not in values:
        return jnp.asarray(values[kernel], jnp.float32)
    q = qwix.QArray(qvalue=jnp.asarray(values[owner + QVALUE]), scale=jnp.asarray(values[owner + QSCALE]),
                    qtype=QTYPE_TABLE[qtype].qwix_qtype)
    return jnp.asarray(qwix.dequantize(q), jnp.float32)


def merge(values: Mapping[str, Any], scale: float, qtype: str = "none") -> dict[str, jax.Array]:
    """Plain parameters: every adapted kernel becomes ``dequant(W) + scale * A @ B`` (float32), adapters dropped;
    ``qtype`` is the run's ``base_weights_qtype``."""
    out = {k: v for k, v in values.items() if not is_adapter(k) and not is_quantized(k)}
    for kernel in adapted_kernels(list(values)):
        owner = kernel[: -len("kernel")]
        a = jnp.asarray(values[owner + LORA_A], jnp.float32)
        b = jnp.asarray(values[owner + LORA_B], jnp.float32)
        w = base_kernel(values, kernel, qtype)
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
    run's ``init_checkpoint``). The base goes through the same qwix adapters as in training (a QLoRA kernel is
    quantized as training quantized it, a bf16 base rounded to bfloat16) before merging. Like ``export_model``,
    the folder keeps HIPIE's DN label encoder in ``training_params/``: the run's when it trained it, else the
    base's."""
    import json
    import shutil

    from segllm_jax import checkpoint as ckpt_lib
    from segllm_jax.errors import InputError
    from segllm_jax.models.segllm import DN_RESIZER
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
    qtype = meta["base_weights_qtype"]
    loaded = ckpt_lib.load(base)
    model = loaded.model  # float32 parameters, as training restores them, then the run's adapters
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), nnx.state(model, nnx.Param)))
    add_adapters(model, lora_cfg, qtype, seed=0)
    values = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with np.load(folder / ADAPTERS_FILE) as npz:
        trained = {k.replace(".", "/"): npz[k] for k in npz.files}
    # HIPIE's DN label encoder, trained when lora.train names it, is no inference parameter: like export_model,
    # the merged folder keeps it in training_params/ (else the base's, unchanged), where init_checkpoint reads it
    dn = {k: trained.pop(k) for k in list(trained) if k.startswith(DN_RESIZER + "/")}
    unknown = sorted(k for k in trained if k not in values)
    if unknown:
        raise InputError(f"the adapters do not fit the base {base}: it has no {', '.join(unknown[:5])}.")
    frozen = store_frozen({k: v for k, v in values.items() if k not in trained}, qtype)  # the base as training saw it
    merged = merge({**frozen, **{k: jnp.asarray(v) for k, v in trained.items()}}, lora_cfg.scale, qtype)
    dtype = jnp.dtype(loaded.config.llm.param_dtype)
    arrays = {k: np.asarray(jnp.asarray(v, dtype)) for k, v in merged.items()}
    with written_atomically(out) as tmp:
        ckpt_lib.save(tmp, loaded.kind, loaded.config, arrays,
                      training_arrays={k: np.asarray(v, dtype) for k, v in dn.items()})
        if not dn and (Path(base) / ckpt_lib.TRAINING_PARAMS).is_dir():
            shutil.copytree(Path(base) / ckpt_lib.TRAINING_PARAMS, tmp / ckpt_lib.TRAINING_PARAMS)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save(tmp)
    return out
