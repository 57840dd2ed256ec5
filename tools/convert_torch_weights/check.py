"""``segllm-jax check-conversion SRC DST``: evidence that a conversion is right.

Runs the ``transformers`` PyTorch model of SRC and our converted model from DST on the same
random inputs and reports, per module (every layer's output), the maximum relative error
``max|ours - ref| / max|ref|``, plus for language models the per-token KL divergence of the
next-token distributions. Fails past the tolerances: float32 relative error 1e-4; bfloat16 mean
KL 0.015 (the relative error of a bf16 model is reported but not gated).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from segllm_jax import checkpoint
from segllm_jax.errors import CheckpointError

FLOAT32_REL_TOL = 1e-4
BF16_KL_TOL = 0.015


@dataclasses.dataclass
class CheckReport:
    kind: str
    dtype: str
    module_errors: list[tuple[str, float, float]]  # (module, max abs, max relative)
    kl_mean: float | None = None
    kl_max: float | None = None

    @property
    def max_rel(self) -> float:
        return max(rel for _, _, rel in self.module_errors)

    @property
    def passed(self) -> bool:
        if self.dtype == "float32":
            return self.max_rel <= FLOAT32_REL_TOL
        return self.kl_mean is not None and self.kl_mean <= BF16_KL_TOL

    def table(self) -> str:
        lines = [f"check-conversion: {self.kind}, dtype {self.dtype}", "",
                 "| module | max abs err | max rel err |", "|---|---|---|"]
        lines += [f"| {name} | {a:.3e} | {r:.3e} |" for name, a, r in self.module_errors]
        if self.kl_mean is not None:
            lines += ["", f"per-token KL(ref || ours): mean {self.kl_mean:.3e}, max {self.kl_max:.3e}"]
        gate = (f"max rel err <= {FLOAT32_REL_TOL:g}" if self.dtype == "float32"
                else f"mean KL <= {BF16_KL_TOL:g}")
        lines += ["", f"{'PASS' if self.passed else 'FAIL'} ({gate})"]
        return "\n".join(lines)


def _err(ours, ref) -> tuple[float, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    abs_err = float(np.abs(ours - ref).max())
    return abs_err, abs_err / max(float(np.abs(ref).max()), 1e-30)


def _precision(config) -> str:
    """'float32' only when both storage and compute are float32; otherwise the lower one gates."""
    return next((d for d in (config.param_dtype, config.dtype) if d != "float32"), "float32")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _check_llama(src: Path, model, config, rng: np.random.Generator) -> CheckReport:
    import torch
    import transformers

    ref_model = transformers.LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    ids = rng.integers(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids), output_hidden_states=True)
    out = model(model.embed(jnp.asarray(ids)), return_layer_outputs=True)
    errors = [("embed_tokens", *_err(model.embed(jnp.asarray(ids)), ref.hidden_states[0]))]
    # transformers' last hidden state is post-norm; the per-layer ones before it are residual streams
    for i, layer_out in enumerate(out.layer_outputs[:-1]):
        errors.append((f"layers.{i}", *_err(layer_out, ref.hidden_states[i + 1])))
    errors.append((f"layers.{len(out.layer_outputs) - 1}+norm", *_err(out.hidden, ref.hidden_states[-1])))
    ref_logits = ref.logits.double().numpy()
    errors.append(("lm_head (logits)", *_err(out.logits, ref_logits)))
    lp, lq = _log_softmax(ref_logits), _log_softmax(np.asarray(out.logits, np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)  # [B, T]
    return CheckReport("llama", _precision(config), errors, float(kl.mean()), float(kl.max()))


def _check_clip(src: Path, model, config, rng: np.random.Generator) -> CheckReport:
    import torch
    import transformers

    ref_model = transformers.CLIPVisionModel.from_pretrained(src, torch_dtype=torch.float32).eval()
    pixels = rng.standard_normal((2, 3, config.image_size, config.image_size)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(pixels), output_hidden_states=True).hidden_states
    ours = model.hidden_states(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    names = ["embeddings+pre_layrnorm"] + [f"layers.{i}" for i in range(len(ours) - 1)]
    return CheckReport("clip_vision", _precision(config),
                       [(n, *_err(o, ref[i])) for i, (n, o) in enumerate(zip(names, ours))])


CHECKS: dict[str, Callable] = {"llama": _check_llama, "clip_vision": _check_clip}


def check_conversion(src: str | Path, dst: str | Path, seed: int = 0) -> CheckReport:
    kind, config, model = checkpoint.load_model(dst)
    if kind not in CHECKS:
        raise CheckpointError(f"check-conversion has no independent reference for kind {kind!r} yet.")
    with jax.default_matmul_precision("highest"):
        return CHECKS[kind](Path(src), model, config, np.random.default_rng(seed))
