"""Training-state memory per device of the 7B SegLLM on several meshes, and single-card inference memory at
bf16 / int8 / int4 weights (writes docs/memory.md's tables).

Computed from shapes only (``nnx.eval_shape``: nothing is allocated) and the shardings of
``segllm_jax.sharding`` (the same logical-axis rules the trainer uses). Counted per device:
float32 parameters (trainable + frozen), float32 gradients of the trainable ones and AdamW's two
float32 moments. Not counted: activations (depend on batch, length and remat), XLA temporaries,
the compiled program, and the data pipeline's host memory.

Inference rows (:func:`inference_rows`): parameters from the shapes of the model as
``segllm_jax.load(DIR, quantize=...)`` builds it (``nnx.eval_shape`` of the quantized model: qwix's int8 /
int4 values at 8 / 4 bits, their scales, and every part left in floating point; LLM and CLIP in bfloat16,
HIPIE in float32 as converted), the bfloat16 KV cache of 2048 tokens, and the LLM program's temporaries
from XLA's memory analysis of the compiled CPU program (one 512-token round on top of the 2048-token
cache), which is measured, not arithmetic; GPU temporaries differ (XLA:GPU fuses qwix's dequantize into the
matmul, XLA:CPU materialises dequantized weights).

    python benchmarks/memory_table.py            # prints the markdown tables
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np

from segllm_jax.config import SegLLMConfig
from segllm_jax.data.pipeline import MixtureConfig
from segllm_jax.sharding import MESH_AXES, logical_to_spec
from segllm_jax.train import step as S
from segllm_jax.train.config import LoraConfig, TrainConfig

# (name, devices, HBM per device in GiB, (data, fsdp, tensor))
MESHES = (
    ("TPU v5p-8 (4 chips)", 95, (1, 4, 1)),
    ("TPU v4-32 (16 chips)", 32, (1, 16, 1)),
    ("TPU v4-32 (16 chips), TP 2", 32, (1, 8, 2)),
    ("8x H100 80GB", 80, (1, 8, 1)),
    ("8x H100 80GB, TP 2", 80, (1, 4, 2)),
    ("8x H100 80GB, DP 2 x FSDP 4", 80, (2, 4, 1)),
)


def per_device_bytes(structure: S.ModelStructure, mesh_shape: tuple[int, int, int]) -> dict[str, float]:
    mesh = types.SimpleNamespace(shape=dict(zip(MESH_AXES, mesh_shape, strict=True)))
    out = {"params": 0.0, "grads": 0.0, "adam": 0.0}
    abstract = structure.abstract()
    for key, axes in structure.logical_axes().items():
        shape = abstract[key].shape
        n = int(np.prod(shape)) * 4  # float32 master weights
        if axes is not None:
            spec = logical_to_spec(axes, shape, mesh)
            for entry in spec:
                for axis in ((entry,) if isinstance(entry, str) else (entry or ())):
                    n /= mesh.shape[axis]
        out["params"] += n
        if S.is_trainable(key):
            out["grads"] += n
            out["adam"] += 2 * n
    return out


CARDS_GB = (24, 48, 80)
KV_TOKENS = 2048
ROUND_TOKENS = 512


def _bits(dtype) -> int:
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_:
        return 8
    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits


def _bytes(tree) -> float:
    import jax

    return sum(int(np.prod(x.shape)) * _bits(x.dtype) / 8 for x in jax.tree.leaves(tree))


def inference_rows(cfg: SegLLMConfig) -> list[dict]:
    """Per weight type (None = bf16): parameter bytes, KV-cache bytes and the compiled LLM round's temporaries."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segllm_jax import quantize as Q
    from segllm_jax.models.llama import KVCache
    from segllm_jax.models.segllm import SegLLM

    bf16 = dict(param_dtype="bfloat16", dtype="bfloat16")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **bf16),
                              vision=dataclasses.replace(cfg.vision, **bf16))
    cache = jax.eval_shape(lambda: KVCache.empty(cfg.llm, 1, KV_TOKENS))
    embeds = jax.ShapeDtypeStruct((1, ROUND_TOKENS, cfg.llm.hidden_size), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, ROUND_TOKENS), bool)
    rows = []
    for qtype in (None, "int8", "int4"):
        def make(qtype=qtype):
            model = SegLLM(cfg, rngs=nnx.Rngs(0))
            return model if qtype is None else Q.quantize_model("segllm", model, qtype)

        model = nnx.eval_shape(make)
        llm_graph, llm_state = nnx.split(model.llm)

        def llm_round(state, embeds, mask, cache, llm_graph=llm_graph):  # this iteration's graph
            out = nnx.merge(llm_graph, state)(embeds, mask, cache=cache)
            return out.logits[:, -1], out.cache

        compiled = jax.jit(llm_round, donate_argnums=(3,)).lower(llm_state, embeds, mask, cache).compile()
        rows.append(dict(qtype=qtype or "bf16", params=_bytes(nnx.state(model, nnx.Param)),
                         llm_params=_bytes(nnx.state(model.llm, nnx.Param)),
                         kv=_bytes(cache), temp=compiled.memory_analysis().temp_size_in_bytes))
    return rows


def print_inference_table(cfg: SegLLMConfig) -> None:
    gib = 2 ** 30
    print(f"\nSingle-card inference, KV cache of {KV_TOKENS} tokens (bf16), one {ROUND_TOKENS}-token round\n")
    print("| weights | params (all) | of which LLM | KV cache | LLM round temporaries, XLA:CPU (measured) | "
          "params + KV + bf16 temporaries | fits |")
    print("|---|---|---|---|---|---|---|")
    rows = inference_rows(cfg)
    activations = rows[0]["temp"]  # the bf16 program's: weight-only quantization leaves activations as they are
    for r in rows:
        total = r["params"] + r["kv"] + activations
        fits = ", ".join(f"{c} GB" for c in CARDS_GB if total < c * 1e9) or "none"
        print(f"| {r['qtype']} | {r['params'] / gib:.2f} GiB | {r['llm_params'] / gib:.2f} GiB "
              f"| {r['kv'] / gib:.2f} GiB | {r['temp'] / gib:.2f} GiB | **{total / gib:.2f} GiB** | {fits} |")


def main() -> None:
    cfg = TrainConfig(model=SegLLMConfig.segllm_7b(), data=MixtureConfig((), (), ".", "."), tokenizer_dir=".")
    structure = S.abstract_structure(cfg)
    abstract = structure.abstract()
    total = sum(int(np.prod(v.shape)) for v in abstract.values())
    trainable = sum(int(np.prod(v.shape)) for k, v in abstract.items() if S.is_trainable(k))
    gib = 2 ** 30
    print(f"SegLLM-7B: {total / 1e9:.3f} B parameters, {trainable / 1e9:.3f} B trainable (architecture.md §T12)\n")
    print("| mesh | (data, fsdp, tensor) | params fp32 | grads fp32 | Adam m+v fp32 | total / device | HBM |")
    print("|---|---|---|---|---|---|---|")
    for name, hbm, shape in MESHES:
        b = per_device_bytes(structure, shape)
        t = sum(b.values())
        print(f"| {name} | {shape} | {b['params'] / gib:.2f} GiB | {b['grads'] / gib:.2f} GiB | "
              f"{b['adam'] / gib:.2f} GiB | **{t / gib:.2f} GiB** | {hbm} GB |")
    print_inference_table(cfg.model)


# single card: (row name, lora, base_weights_qtype)
SINGLE_CARD = (("full fine-tune", None, "none"), ("LoRA r16 (fp32 base)", LoraConfig(), "none"),
               ("LoRA r16 (bf16 base)", LoraConfig(), "bf16"), ("QLoRA r16 (int8 base)", LoraConfig(), "int8"),
               ("QLoRA r16 (nf4 base)", LoraConfig(), "nf4"))


def _stored_bytes(dtype, qtype: str) -> float:
    """Bytes per element of a frozen leaf as the train state stores it (nf4 codes packed two per byte)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(jnp.uint4):  # qwix's nf4 codes
        return 0.5
    if qtype == "bf16" and np.issubdtype(dtype, np.floating):  # lora.store_frozen
        return 2.0
    return float(dtype.itemsize)


def single_card_bytes(cfg: TrainConfig) -> dict[str, float]:
    """Parameters (trainable + frozen as stored), gradients and AdamW moments of one card, from shapes only (a
    QLoRA kernel is qwix's quantized values + float32 scales in the model's structure already)."""
    structure = S.abstract_structure(cfg)
    out = {"params": 0.0, "grads": 0.0, "adam": 0.0}
    for key, v in structure.abstract().items():
        n = int(np.prod(v.shape))
        if S.trains(key, cfg):
            out["params"] += 4 * n
            out["grads"] += 4 * n
            out["adam"] += 8 * n
        else:
            out["params"] += _stored_bytes(v.dtype, cfg.base_weights_qtype) * n
    return out


def single_card_table() -> None:
    """Training state of one card per mode (batch-independent; activations at batch 1-4 with full remat are
    not in these numbers: see docs/memory.md)."""
    gib = 2 ** 30
    print("\n| single card | params | grads | Adam m+v | state total | fits 24 / 48 / 80 GB (state only) |")
    print("|---|---|---|---|---|---|")
    for name, lora, qtype in SINGLE_CARD:
        cfg = TrainConfig(model=SegLLMConfig.segllm_7b(), data=MixtureConfig((), (), ".", "."), tokenizer_dir=".",
                          lora=lora, base_weights_qtype=qtype, mesh_shape=(1, 1, 1))
        b = single_card_bytes(cfg)
        t = sum(b.values())
        fits = " / ".join("yes" if t < hbm * 1e9 else "no" for hbm in (24, 48, 80))
        print(f"| {name} | {b['params'] / gib:.2f} GiB | {b['grads'] / gib:.2f} GiB | {b['adam'] / gib:.2f} GiB | "
              f"**{t / gib:.2f} GiB** | {fits} |")


if __name__ == "__main__":
    main()
    single_card_table()
