"""Weight-only quantized inference through qwix: ``segllm_jax.load(DIR, quantize="int8" | "int4")``.

Every :class:`~segllm_jax.models.layers.Linear` of the LLM (and, if asked, of the CLIP tower) is handed to
``qwix.quantize_model`` with a :class:`qwix.PtqProvider`: its first call replaces the kernel by a qwix
``QArray`` (int8 or int4 values + per-output-channel scales; int4 uses groups of 128 input features where
the input width is a larger multiple of 128), and every later call runs qwix's ``jnp.dot``, which
dequantizes on the fly. Activations stay floating point in bfloat16 (:data:`COMPUTE_DTYPE`, set before the
model is built); biases, norms, the token embedding table, the KV cache, the projector, the [SEG]
predictor and HIPIE are not quantized.

Quantizing each Linear on its own (rather than the whole model) keeps every method of the model usable
(``run_llm``, ``image_embeds``, ``seg_prompts``, ...): qwix intercepts only the quantized module's
``__call__``. Importing this module is light (the CLI reads :data:`QTYPES`); jax and qwix load on use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from segllm_jax.errors import ConfigError

QTYPES = ("int8", "int4")
COMPUTE_DTYPE = "bfloat16"  # activations of the quantized parts
INT4_GROUP = 128  # input features per int4 scale (when the input width is a larger multiple of it)
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


def quantized_config(kind: str, config: Any, *, vision: bool = False, dtype: str = COMPUTE_DTYPE) -> Any:
    """``config`` with the compute dtype of the parts to quantize set to ``dtype``."""
    if kind not in QUANTIZABLE_KINDS:
        raise ConfigError(f"quantization applies to {', '.join(QUANTIZABLE_KINDS)} checkpoints, not {kind!r}.")
    if kind == "segllm":
        llm = dataclasses.replace(config.llm, dtype=dtype)
        tower = dataclasses.replace(config.vision, dtype=dtype) if vision else config.vision
        return dataclasses.replace(config, llm=llm, vision=tower)
    return dataclasses.replace(config, dtype=dtype)


def _rule(qtype: str, in_features: int):
    import jax.numpy as jnp
    import qwix

    tile = INT4_GROUP if qtype == "int4" and in_features > INT4_GROUP and in_features % INT4_GROUP == 0 else None
    return qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.dtype(qtype), tile_size=tile)


def quantize_linears(module, qtype: str) -> int:
    """Replaces every ``Linear`` inside ``module`` by its qwix-quantized copy, in place; returns how many.

    The kernels are quantized from the values ``module`` holds (the checkpoint's weights)."""
    import jax.numpy as jnp
    import qwix
    from flax import nnx

    from segllm_jax.models.layers import Linear

    qtype = check_qtype(qtype)
    found = [(path, m) for path, m in nnx.iter_modules(module) if isinstance(m, Linear) and path]
    for path, linear in found:
        in_features = linear.kernel.shape[0]
        provider = qwix.PtqProvider([_rule(qtype, in_features)])
        sample = jnp.zeros((1, 1, in_features), linear.dtype)
        quantized = qwix.quantize_model(linear, provider, sample)
        parent = module
        for step in path[:-1]:
            parent = parent[step] if isinstance(step, int) else getattr(parent, step)
        if isinstance(path[-1], int):
            parent[path[-1]] = quantized
        else:
            setattr(parent, path[-1], quantized)
    return len(found)


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
