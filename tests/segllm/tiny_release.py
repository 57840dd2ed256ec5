"""A complete tiny SegLLM checkpoint folder in the release layout, made without PyTorch.

Real key names (the golden SegLLM key list), tiny shapes (a random ``SegLLM`` of the tiny config,
written back through the converter's own routing with each transform inverted), safetensors
shards + index, the mistral-common SentencePiece tokenizer with the 11 added tokens, and a
``config.json`` with the ``mm_*`` fields plus our ``segllm_jax`` extension for the tiny HIPIE.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file
from tokenizer_fixture import make_llama_tokenizer_dir

from segllm_jax.checkpoint import build_model
from segllm_jax.config import HipieConfig, SegLLMConfig, VisionConfig
from segllm_jax.tokenizer import SegTokenizer
from segllm_jax_convert import engine
from segllm_jax_convert.segllm import segllm_table

from .conftest import golden_segllm_dir


def tiny_config() -> SegLLMConfig:
    # two CLIP blocks like the golden key list (select_layer -2 runs one of them); HIPIE keeps its six
    # decoder layers because the release names the encoder-proposal heads by the index 6
    return SegLLMConfig.tiny(vision=VisionConfig.tiny(num_layers=2), hipie=HipieConfig.tiny(dec_layers=6))


def _to_source(transform: engine.Invertible, array: np.ndarray) -> np.ndarray:
    return transform.inverse(array)  # the table's own inverse (the one `segllm-jax export` uses)


def _random_params(model, seed: int) -> dict[str, np.ndarray]:
    """Host-side random values for an abstract model (no XLA compile), shaped like the recipe's rules."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, shape = "/".join(map(str, path)), var.get_value().shape
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "running_var":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bg_query_refs" or name.endswith("bg_query_refs/embedding"):
            value = rng.uniform(0.05, 0.95, shape)
        elif leaf == "log_scale":
            value = np.zeros(shape)
        elif leaf == "scale" or (leaf == "weight" and len(shape) == 1):
            value = 1 + rng.normal(0, 0.05, shape)
        elif leaf in ("bias", "running_mean") or len(shape) == 1:
            value = rng.normal(0, 0.02, shape)
        elif leaf == "embedding":
            value = rng.normal(0, 0.5 if name.startswith("segmentator/") else 0.02, shape)
        else:  # kernels [..., in, out]: fan-in = everything but the output axis
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        out[name] = value.astype(np.float32)
    return out


def tiny_state(seed: int = 0) -> tuple[SegLLMConfig, dict[str, np.ndarray]]:
    """The tiny config and a release-style state dict (real key names, tiny shapes)."""
    cfg = tiny_config()
    params = _random_params(build_model("segllm", cfg, abstract=True), seed)
    table = segllm_table(cfg)
    keys = [k["key"] for k in json.loads((golden_segllm_dir() / "state_dict_keys.json").read_text())["keys"]]
    state, filled = {}, set()
    for key in keys:
        target, transform, _ = table.route(key)
        if target in params:
            state[key] = np.ascontiguousarray(_to_source(transform, params[target]))
            filled.add(target)
    assert filled == set(params), f"targets without a release key: {sorted(set(params) - filled)[:5]}"
    return cfg, state


def _clip_hf_fields(cfg: SegLLMConfig) -> dict:
    v = cfg.vision
    return {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "image_size": v.image_size, "patch_size": v.patch_size}


def release_config(cfg: SegLLMConfig, with_vision: bool = True) -> dict:
    """The golden release ``config.json`` with tiny sizes, plus our ``segllm_jax`` extension."""
    release = json.loads((golden_segllm_dir() / "checkpoint_files" / "config.json").read_text())
    llm = cfg.llm
    release.update(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                   num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                   num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim, vocab_size=llm.vocab_size,
                   max_position_embeddings=llm.max_position_embeddings, mm_hidden_size=cfg.vision.hidden_size)
    release["segllm_jax"] = {"hipie": dataclasses.asdict(cfg.hipie), "hipie_image_size": cfg.hipie_image_size}
    if with_vision:
        release["segllm_jax"]["vision"] = _clip_hf_fields(cfg)
    return release


def write_tiny_release(dst: Path, seed: int = 0, num_shards: int = 3) -> Path:
    cfg, state = tiny_state(seed)
    dst.mkdir(parents=True)
    names = sorted(state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.asarray(names, dtype=object), num_shards)):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, dst / fname)
        weight_map.update({k: fname for k in chunk})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(release_config(cfg), indent=2))
    make_llama_tokenizer_dir(dst, with_config=True)
    SegTokenizer.from_pretrained(dst).save(dst)
    return dst


def write_tiny_training_sources(root: Path, seed: int = 0) -> tuple[Path, Path, Path, dict[str, np.ndarray]]:
    """The three sources SegLLM training starts from, tiny: a LLaVA-1.5 folder (32000-token vocabulary,
    LLaMA + mm_projector), a CLIP vision folder and a HIPIE ``r50_parts.pth``. Also returns the state."""
    import torch

    cfg, state = tiny_state(seed)
    base = 32000
    llava, clip = root / "llava-v1.5", root / "clip-vit"
    llava.mkdir(parents=True)
    llava_state = {k: (v[:base] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
                   for k, v in state.items()
                   if not k.startswith(("model.vision_tower.", "model.mask_enc_head.", "model.segmentator"))}
    save_file(llava_state, llava / "model.safetensors")
    llava_cfg = release_config(cfg, with_vision=False)
    llava_cfg.update(vocab_size=base)
    del llava_cfg["segmentator"]
    (llava / "config.json").write_text(json.dumps(llava_cfg, indent=2))
    make_llama_tokenizer_dir(llava, with_config=True)
    clip.mkdir()
    prefix = "model.vision_tower.vision_tower."
    save_file({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, clip / "model.safetensors")
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **_clip_hf_fields(cfg)}))
    hipie_prefix = "model.segmentator.hipie."
    torch.save({k[len(hipie_prefix):]: torch.from_numpy(v.copy()) for k, v in state.items()
                if k.startswith(hipie_prefix)}, root / "r50_parts.pth")
    return llava, clip, root / "r50_parts.pth", state
