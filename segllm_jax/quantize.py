"""Weight-only quantized inference through qwix: ``segllm_jax.load(DIR, quantize="int8" | "int4")``.

Every :class:`~segllm_jax.models.layers.Linear` of the LLM (and, if asked, of the CLIP tower) is handed to
qwix with a :class:`qwix.PtqProvider` (:func:`apply_to_linears`): its first call replaces the kernel by a qwix
``QArray`` (int8 or int4 values + per-output-channel scales; int4 uses groups of 128 input features where
the input width is a larger multiple of 128), and every later call runs qwix's ``jnp.dot``, which
dequantizes on the fly. Activations stay floating point in bfloat16 (:data:`COMPUTE_DTYPE`, set before the
model is built); biases, norms, the token embedding table, the KV cache, the projector, the [SEG]
predictor and HIPIE are not quantized.

Quantizing each Linear on its own (rather than the whole model) keeps every method of the model usable
(``run_llm``, ``image_embeds``, ``seg_prompts``, ...): qwix intercepts only the quantized module's
``__call__``. LoRA / QLoRA training (``segllm_jax.train.lora``) hands its target Linears to qwix the same way.

:data:`QTYPE_TABLE` is the one list of the weight qtypes the project uses, for inference (:data:`QTYPES`) and for
a QLoRA run's frozen base (:data:`LORA_BASE_QTYPES`, read by ``TrainConfig``). Importing this module is light
(the CLI and the training config read the table); jax and qwix load on use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from segllm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class QType:
    """One weight qtype: what qwix is given, how finely it is scaled, and where the project offers it."""

    qwix_qtype: str  # qwix's name of it (``QuantizationRule.weight_qtype``: a dtype name, or "nf4")
    group: int | None  # input features per scale where the input width is a larger multiple (else per column)
    inference: bool  # segllm_jax.load(quantize=...), `--quantize`
    lora_base: bool  # TrainConfig.base_weights_qtype: the frozen kernels of a QLoRA run


QTYPE_TABLE: dict[str, QType] = {
    "int8": QType("int8", None, inference=True, lora_base=True),
    "int4": QType("int4", 128, inference=True, lora_base=False),
    "nf4": QType("nf4", 64, inference=False, lora_base=True),  # QLoRA's 4-bit NormalFloat, blocks of 64
}
QTYPES = tuple(k for k, q in QTYPE_TABLE.items() if q.inference)  # ("int8", "int4")
LORA_BASE_QTYPES = tuple(k for k, q in QTYPE_TABLE.items() if q.lora_base)  # ("int8", "nf4")
COMPUTE_DTYPE = "bfloat16"  # activations of the quantized parts
QUANTIZABLE_KINDS = ("segllm", "llama", "clip_vision")


def check_qtype(qtype: Any) -> str:
    """``qtype`` if it is one of :data:`QTYPES`, else one :class:`ConfigError` naming the allowed values."""
    import numpy as np

    if isinstance(qtype, str) and qtype in QTYPES:
        return qtype
    try:
        as_dtype = np.dtype(qtype) if isinstance(qtype, str) else None
    except TypeError:
        as_dtype = None
    what = "a dtype that weight-only quantization through qwix does not support here" if as_dtype else "unknown"
    raise ConfigError(f"quantize={qtype!r} is {what}; use one of {', '.join(QTYPES)} (weight-only, activations "
                      f"in {COMPUTE_DTYPE}), or no quantization.")


def weight_rule_fields(qtype: str, in_features: int) -> dict[str, Any]:
    """The ``weight_qtype`` and ``tile_size`` of a qwix rule quantizing an ``[in_features, out]`` kernel to ``qtype``
    (a :data:`QTYPE_TABLE` key): per output column, or per ``group`` inputs of each column where ``in_features`` is
    a larger multiple of the group."""
    import jax.numpy as jnp

    q = QTYPE_TABLE[qtype]
    tile = q.group if q.group and in_features > q.group and in_features % q.group == 0 else None
    return {"weight_qtype": q.qwix_qtype if q.qwix_qtype == "nf4" else jnp.dtype(q.qwix_qtype), "tile_size": tile}


def quantized_config(kind: str, config: Any, *, vision: bool = False, dtype: str = COMPUTE_DTYPE) -> Any:
    """``config`` with the compute dtype of the parts to quantize set to ``dtype``."""
    if kind not in QUANTIZABLE_KINDS:
        raise ConfigError(f"quantization applies to {', '.join(QUANTIZABLE_KINDS)} checkpoints, not {kind!r}.")
    if kind == "segllm":
        llm = dataclasses.replace(config.llm, dtype=dtype)
        tower = dataclasses.replace(config.vision, dtype=dtype) if vision else config.vision
        return dataclasses.replace(config, llm=llm, vision=tower)
    return dataclasses.replace(config, dtype=dtype)


def apply_to_linears(module, provider_for: Callable[[Any], Any], paths: Sequence[str] | None = None, *,
                     rngs_for: Callable[[int], Any] | None = None, init_in_param_dtype: bool = False) -> list[str]:
    """Hands each :class:`~segllm_jax.models.layers.Linear` of ``module`` (those at ``paths``, '/'-joined; default:
    all but ``module`` itself) to qwix with ``provider_for(linear)``, and puts qwix's copy in its place; returns
    the paths, in ``module``'s order.

    qwix intercepts the copy's ``__call__`` only, and its first call (a zero input ``[1, 1, in]``) does the
    conversion: a PTQ rule replaces the kernel by a ``QArray``, a LoRA rule adds ``kernel_lora_a`` /
    ``kernel_lora_b`` (initialised from ``rngs_for(i)``, an ``nnx.Rngs``, for the i-th Linear). The copy's qwix
    path is its path in ``module`` (``llm/layers/0/self_attn/q_proj``), so rules' ``module_path`` patterns read
    like the model's paths. ``init_in_param_dtype``: the first call computes in the kernel's parameter dtype, so
    the kernel is quantized, and adapters are created, from the parameters themselves (float32 master weights
    in training) rather than from their compute-dtype cast."""
    import jax.numpy as jnp
    import qwix
    from flax import nnx

    from segllm_jax.models.layers import Linear

    found = [(path, m) for path, m in nnx.iter_modules(module) if isinstance(m, Linear) and path]
    if paths is not None:
        wanted = set(paths)
        found = [(path, m) for path, m in found if "/".join(map(str, path)) in wanted]
    for i, (path, linear) in enumerate(found):
        dtype = str(linear.kernel.get_value().dtype) if init_in_param_dtype else linear.dtype
        sample = jnp.zeros((1, 1, linear.kernel.shape[0]), dtype)
        copy = qwix.quantize_model(linear, provider_for(linear), sample, skip_nnx_init=True)
        # qwix gave the copy the path () (it sees only the copy): its first call runs here, under the real path
        copy.qwix_path, copy.disable_quant_stats_update, copy.dtype = tuple(path), True, dtype
        copy.qwix_rngs = None if rngs_for is None else nnx.data(rngs_for(i))
        copy(sample)
        copy.qwix_rngs, copy.disable_quant_stats_update, copy.dtype = None, False, linear.dtype
        parent = module
        for step in path[:-1]:
            parent = parent[step] if isinstance(step, int) else getattr(parent, step)
        if isinstance(path[-1], int):
            parent[path[-1]] = copy
        else:
            setattr(parent, path[-1], copy)
    return ["/".join(map(str, path)) for path, _ in found]


def quantize_linears(module, qtype: str) -> int:
    """Replaces every ``Linear`` inside ``module`` by its qwix-quantized copy, in place; returns how many.

    The kernels are quantized from the values ``module`` holds (the checkpoint's weights)."""
    import qwix

    qtype = check_qtype(qtype)
    return len(apply_to_linears(module, lambda linear: qwix.PtqProvider(
        [qwix.QuantizationRule(module_path=".*", **weight_rule_fields(qtype, linear.kernel.shape[0]))])))


def quantize_model(kind: str, model, qtype: str, *, vision: bool = False):
    """The LLM's Linears (and the CLIP tower's, with ``vision=True``) of a loaded model, quantized in place.

    Build the model from :func:`quantized_config` so its activations are in :data:`COMPUTE_DTYPE`."""
    check_qtype(qtype)
    if kind == "segllm":
        quantize_linears(model.llm, qtype)
        if vision:
            quantize_linears(model.vision_tower, qtype)
    elif kind in QUANTIZABLE_KINDS:
        quantize_linears(model, qtype)
    else:
        raise ConfigError(f"quantization applies to {', '.join(QUANTIZABLE_KINDS)} checkpoints, not {kind!r}.")
    return model
