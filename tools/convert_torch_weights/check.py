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


def _compare_llama(ref_model, model, vocab_size: int, rng: np.random.Generator):
    """Per-layer errors and the logits' per-token KL of our LLaMA against a transformers one."""
    import torch

    ids = rng.integers(0, vocab_size, (2, 32))
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
    return errors, float(kl.mean()), float(kl.max())


def _compare_clip(ref_model, model, image_size: int, rng: np.random.Generator):
    import torch

    pixels = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(pixels), output_hidden_states=True).hidden_states
    ours = model.hidden_states(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    names = ["embeddings+pre_layrnorm"] + [f"layers.{i}" for i in range(len(ours) - 1)]
    return [(n, *_err(o, ref[i])) for i, (n, o) in enumerate(zip(names, ours, strict=True))]


def _compare_mlp(ref_module, ours, in_features: int, rng: np.random.Generator):
    import torch

    x = rng.standard_normal((4, in_features)).astype(np.float32)
    with torch.no_grad():
        want = ref_module(torch.as_tensor(x)).numpy()
    return _err(ours(jnp.asarray(x)), want)


def _check_llama(src: Path, model, config, rng: np.random.Generator) -> CheckReport:
    import torch
    import transformers

    ref_model = transformers.LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    errors, kl_mean, kl_max = _compare_llama(ref_model, model, config.vocab_size, rng)
    return CheckReport("llama", _precision(config), errors, kl_mean, kl_max)


def _check_clip(src: Path, model, config, rng: np.random.Generator) -> CheckReport:
    import torch
    import transformers

    ref_model = transformers.CLIPVisionModel.from_pretrained(src, torch_dtype=torch.float32).eval()
    return CheckReport("clip_vision", _precision(config), _compare_clip(ref_model, model, config.image_size, rng))


def _load_strict(module, state: dict, what: str, unused: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` that tolerates only missing keys of modules SegLLM never runs (``unused``)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(u in k for u in unused)]
    if missing or unexpected:
        raise CheckpointError(f"the PyTorch reference for {what} does not match the checkpoint "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}).")


def _check_segllm(src: Path, model, config, rng: np.random.Generator) -> CheckReport:
    """Every part with an independent reference: LLaMA, CLIP tower, projector, box encoder, predictor.

    HIPIE has no PyTorch reference outside the original repository; its evidence is the golden
    tests against outputs of the original code.
    """
    import torch
    import transformers

    from segllm_jax_convert.io import open_checkpoint

    source = open_checkpoint(src)
    tensors = lambda prefix: {k[len(prefix):]: torch.from_numpy(np.array(source.load(k), np.float32))  # noqa: E731
                              for k in source if k.startswith(prefix)}
    llm_cfg = config.llm
    hf_llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=llm_cfg.vocab_size, hidden_size=llm_cfg.hidden_size, intermediate_size=llm_cfg.intermediate_size,
        num_hidden_layers=llm_cfg.num_layers, num_attention_heads=llm_cfg.num_heads,
        num_key_value_heads=llm_cfg.num_kv_heads, head_dim=llm_cfg.head_dim, rms_norm_eps=llm_cfg.rms_norm_eps,
        rope_theta=llm_cfg.rope_theta, max_position_embeddings=llm_cfg.max_position_embeddings,
        tie_word_embeddings=llm_cfg.tie_word_embeddings, attn_implementation="eager")).eval()
    llm_state = {k: v for k, v in tensors("").items()
                 if (k.startswith("model.layers.") or k in ("model.embed_tokens.weight", "model.norm.weight",
                                                            "lm_head.weight"))}
    _load_strict(hf_llm, llm_state, "the LLM")
    errors, kl_mean, kl_max = _compare_llama(hf_llm, model.llm, llm_cfg.vocab_size, rng)
    errors = [(f"llm.{n}", a, r) for n, a, r in errors]

    v = config.vision
    # only the blocks up to the selected layer: a release may or may not carry the unused last ones
    hf_clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers_run,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, attn_implementation="eager")).eval()
    clip_state = tensors("model.vision_tower.vision_tower.vision_model.")
    wanted = set(hf_clip.state_dict())
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in wanted) else ""
    _load_strict(hf_clip, {prefix + k: t for k, t in clip_state.items() if prefix + k in wanted}, "the CLIP tower",
                 unused=("post_layernorm.",))
    errors += [(f"vision_tower.{n}", a, r) for n, a, r in _compare_clip(hf_clip, model.vision_tower, v.image_size, rng)]

    def mlp(prefix: str, inp: int, hidden: int, out: int):
        seq = torch.nn.Sequential(torch.nn.Linear(inp, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out)).eval()
        _load_strict(seq, tensors(prefix), prefix.rstrip("."))
        return seq

    d = llm_cfg.hidden_size
    errors.append(("mm_projector", *_compare_mlp(mlp("model.mm_projector.", v.hidden_size, d, d),
                                                 model.mm_projector, v.hidden_size, rng)))
    box = torch.nn.Linear(4, d).eval()
    _load_strict(box, tensors("model.mask_enc_head."), "mask_enc_head")
    errors.append(("mask_enc_head", *_compare_mlp(box, model.mask_enc_head, 4, rng)))
    out = config.predictor.out_features
    errors.append(("segmentator_predictor", *_compare_mlp(mlp("model.segmentator_predictor.", d, d, out),
                                                          model.segmentator_predictor, d, rng)))
    return CheckReport("segllm (HIPIE: see the golden tests)", _precision(config.llm), errors, kl_mean, kl_max)


CHECKS: dict[str, Callable] = {"llama": _check_llama, "clip_vision": _check_clip, "segllm": _check_segllm}


def check_conversion(src: str | Path, dst: str | Path, seed: int = 0) -> CheckReport:
    kind, config, model = checkpoint.load_model(dst)
    if kind not in CHECKS:
        raise CheckpointError(f"check-conversion has no independent reference for kind {kind!r} yet.")
    with jax.default_matmul_precision("highest"):
        return CHECKS[kind](Path(src), model, config, np.random.default_rng(seed))
