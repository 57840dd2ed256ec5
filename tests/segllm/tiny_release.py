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

from segllm_jax.checkpoint import build_model
from segllm_jax.config import HipieConfig, SegLLMConfig, VisionConfig
from segllm_jax.tokenizer import SegTokenizer
from segllm_jax_convert import engine
from segllm_jax_convert.segllm import segllm_table
from tokenizer_fixture import make_llama_tokenizer_dir

from .conftest import golden_segllm_dir

_INVERSE = {
    engine.identity: lambda x: x,
    engine.linear_kernel: lambda x: x.T,
    engine.conv_kernel: lambda x: x.transpose(3, 2, 0, 1),  # HWIO -> OIHW
}


def tiny_config() -> SegLLMConfig:
    # two CLIP blocks like the golden key list (select_layer -2 runs one of them); HIPIE keeps its six
    # decoder layers because the release names the encoder-proposal heads by the index 6
    return SegLLMConfig.tiny(vision=VisionConfig.tiny(num_layers=2), hipie=HipieConfig.tiny(dec_layers=6))


def _to_source(transform, array: np.ndarray) -> np.ndarray:
    inverse = _INVERSE.get(transform)
    return inverse(array) if inverse else array  # the remaining transforms only slice (G1 query table)


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


def write_tiny_release(dst: Path, seed: int = 0, num_shards: int = 3) -> Path:
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

    dst.mkdir(parents=True)
    names = sorted(state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.asarray(names, dtype=object), num_shards)):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, dst / fname)
        weight_map.update({k: fname for k in chunk})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    release = json.loads((golden_segllm_dir() / "checkpoint_files" / "config.json").read_text())
    llm = cfg.llm
    release.update(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                   num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                   num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim, vocab_size=llm.vocab_size,
                   max_position_embeddings=llm.max_position_embeddings, mm_hidden_size=cfg.vision.hidden_size)
    v = cfg.vision
    release["segllm_jax"] = {
        "vision": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                   "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                   "image_size": v.image_size, "patch_size": v.patch_size},
        "hipie": dataclasses.asdict(cfg.hipie),
        "hipie_image_size": cfg.hipie_image_size,
    }
    (dst / "config.json").write_text(json.dumps(release, indent=2))
    make_llama_tokenizer_dir(dst, with_config=True)
    SegTokenizer.from_pretrained(dst).save(dst)
    return dst
