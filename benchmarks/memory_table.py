"""Training-state memory per device of the 7B SegLLM on several meshes, single-card training memory (state + the
LLM's activations) and single-card inference memory at bf16 / int8 / int4 weights (writes docs/memory.md's tables).

Computed from shapes only (``nnx.eval_shape``: nothing is allocated) and the shardings of
``segllm_jax.sharding`` (the same logical-axis rules the trainer uses). Counted per device:
float32 parameters (trainable + frozen), float32 gradients of the trainable ones and AdamW's two
float32 moments. Not counted in the mesh table: activations (depend on batch, length and remat), XLA
temporaries, the compiled program, and the data pipeline's host memory.

Single-card training rows (:func:`single_card_table`): the same state for one device, plus the LLM's training
activations at batch 1 / 2 / 4 from XLA's memory analysis of the compiled CPU program (:func:`llm_training_temp`:
forward + backward of the LLaMA-7B at the full context length with the trainer's remat), compiled at
:data:`FIT_LAYERS` decoder layers and extrapolated linearly to 32 (``--validate`` also compiles all 32 layers at
batch 1 and prints both).

Inference rows (:func:`inference_rows`): parameters from the shapes of the model as
``segllm_jax.load(DIR, quantize=...)`` builds it (``nnx.eval_shape`` of the quantized model: qwix's int8 /
int4 values at 8 / 4 bits, their scales, and every part left in floating point; LLM and CLIP in bfloat16,
HIPIE in float32 as converted), the bfloat16 KV cache of 2048 tokens, and the LLM program's temporaries
from XLA's memory analysis of the compiled CPU program (one 512-token round on top of the 2048-token
cache), which is measured, not arithmetic; GPU temporaries differ (XLA:GPU fuses qwix's dequantize into the
matmul, XLA:CPU materialises dequantized weights).

    python benchmarks/memory_table.py            # prints the markdown tables
    python benchmarks/memory_table.py --validate # + the 32-layer compiles that check the extrapolation
"""

from __future__ import annotations

import argparse
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from segllm_jax.config import SegLLMConfig
from segllm_jax.data.pipeline import MixtureConfig
from segllm_jax.sharding import MESH_AXES, logical_to_spec
from segllm_jax.train import lora as lora_lib
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
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_:
        return 8
    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits


def _bytes(tree) -> float:
    return sum(int(np.prod(x.shape)) * _bits(x.dtype) / 8 for x in jax.tree.leaves(tree))


def inference_rows(cfg: SegLLMConfig) -> list[dict]:
    """Per weight type (None = bf16): parameter bytes, KV-cache bytes and the compiled LLM round's temporaries."""
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
# the LLM training programs compiled for their activations: (name, lora, base_weights_qtype); every LoRA row takes
# the bf16-base program's (the frozen base reaches the matmuls in the compute dtype whatever it is stored as; see
# docs/memory.md for what XLA:CPU does with an fp32 / int8 / nf4 one)
FULL_PROGRAM, LORA_PROGRAM = "full fine-tune", "LoRA r16, bf16 base"
ACTIVATION_PROGRAMS = ((FULL_PROGRAM, None, "none"), (LORA_PROGRAM, LoraConfig(), "bf16"),
                       ("QLoRA r16, nf4 base", LoraConfig(), "nf4"))
TRAIN_BATCHES = (1, 2, 4)
# decoder layers the training programs are compiled with; their temporaries are extrapolated linearly from these
# two depths to the model's (from 1 to 2 layers they are not linear yet, from 3 on they are: docs/memory.md)
FIT_LAYERS = (3, 4)
# XLA:CPU drops optimization barriers right after its first CSE, before scheduling, so the recomputation that
# remat asks for can be merged back into the forward pass and scheduled early (XLA:GPU drops them only after
# scheduling); keeping them gives the CPU program the remat the trainer asks for (numbers in docs/memory.md)
KEEP_REMAT_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def single_card_config(lora: LoraConfig | None, qtype: str, layers: int | None = None) -> TrainConfig:
    """The single-device SegLLM-7B training config of one mode (``layers``: LLM depth, same widths)."""
    model = SegLLMConfig.segllm_7b()
    if layers is not None:
        model = dataclasses.replace(model, llm=dataclasses.replace(model.llm, num_layers=layers))
    return TrainConfig(model=model, data=MixtureConfig((), (), ".", "."), tokenizer_dir=".", lora=lora,
                       base_weights_qtype=qtype, mesh_shape=(1, 1, 1))


def _abstract_state(cfg: TrainConfig) -> tuple[S.ModelStructure, dict, dict]:
    """(structure, trainable leaves, frozen leaves as the train state stores them): shapes only."""
    structure = S.abstract_structure(cfg)
    params, frozen = S.split_trainable(structure.abstract(), cfg)
    return structure, params, jax.eval_shape(lambda f: lora_lib.store_frozen(f, cfg.base_weights_qtype), frozen)


def llm_training_temp(cfg: TrainConfig, batches: tuple[int, ...]) -> dict[int, int]:
    """XLA temp bytes of the compiled CPU program of ``cfg``'s LLM training pass, per batch size: the gradients of
    the LLM's trainable parameters (float32, the program's outputs) of next-token cross-entropy, over
    ``context_length`` input embeddings of the compute dtype, with the train step's parameter handling (the
    state's trainable / stored frozen leaves, ``ModelStructure.merge``) and remat (``apply_remat``). Not in it:
    CLIP, HIPIE, the projector and predictor, the embeddings' gradient, the optimizer update."""
    structure, params, frozen = _abstract_state(cfg)
    llm = {k: v for k, v in params.items() if k.startswith("llm/")}
    rest = {k: v for k, v in params.items() if k not in llm}

    def llm_grads(llm, rest, frozen, embeds, labels):
        def objective(llm):
            model = S.apply_remat(structure.merge({**llm, **rest, **frozen}), cfg.remat)
            logits = model.llm(embeds).logits[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, 1:]).mean()

        return jax.grad(objective)(llm)

    seq, width = cfg.model.context_length, cfg.model.llm.hidden_size
    out = {}
    for b in batches:
        embeds = jax.ShapeDtypeStruct((b, seq, width), jnp.dtype(cfg.compute_dtype))
        labels = jax.ShapeDtypeStruct((b, seq), jnp.int32)
        compiled = jax.jit(llm_grads).lower(llm, rest, frozen, embeds, labels).compile(KEEP_REMAT_BARRIERS)
        out[b] = compiled.memory_analysis().temp_size_in_bytes
    return out


def training_activations(lora: LoraConfig | None, qtype: str) -> dict[int, dict]:
    """Per batch size: the temporaries at the :data:`FIT_LAYERS` depths, their slope per layer, and the linear
    extrapolation to SegLLM-7B's depth (``bytes``)."""
    depth = SegLLMConfig.segllm_7b().llm.num_layers
    la, lb = FIT_LAYERS
    ta, tb = (llm_training_temp(single_card_config(lora, qtype, layers), TRAIN_BATCHES) for layers in FIT_LAYERS)
    out = {}
    for b in TRAIN_BATCHES:
        slope = (tb[b] - ta[b]) / (lb - la)
        out[b] = dict(temps=(ta[b], tb[b]), per_layer=slope, bytes=tb[b] + (depth - lb) * slope)
    return out


def print_activation_table(measured: dict[str, dict[int, dict]]) -> None:
    gib, mib = 2 ** 30, 2 ** 20
    cfg = single_card_config(None, "none")
    la, lb = FIT_LAYERS
    print(f"\nLLM training temporaries, XLA:CPU (measured): forward + backward of the LLaMA-7B, "
          f"{cfg.model.context_length} tokens, remat \"{cfg.remat}\"\n")
    print(f"| LLM program | batch | {la} layers | {lb} layers | per layer | {cfg.model.llm.num_layers} layers "
          "(extrapolated) |")
    print("|---|---|---|---|---|---|")
    for name, rows in measured.items():
        for b, r in rows.items():
            print(f"| {name} | {b} | {r['temps'][0] / gib:.3f} GiB | {r['temps'][1] / gib:.3f} GiB | "
                  f"{r['per_layer'] / mib:.1f} MiB | **{r['bytes'] / gib:.2f} GiB** |")


def validate_extrapolation(measured: dict[str, dict[int, dict]]) -> None:
    """Compiles every activation program at the model's full depth (batch 1) and prints it beside the
    extrapolation (minutes per program: ``--validate`` only)."""
    gib = 2 ** 30
    print("\n| LLM program, batch 1 | all layers compiled | extrapolated | difference |")
    print("|---|---|---|---|")
    for name, lora, qtype in ACTIVATION_PROGRAMS:
        full = llm_training_temp(single_card_config(lora, qtype), (1,))[1]
        guess = measured[name][1]["bytes"]
        print(f"| {name} | {full / gib:.3f} GiB | {guess / gib:.3f} GiB | {(guess - full) / 2 ** 20:+.1f} MiB |")


def single_card_bytes(cfg: TrainConfig) -> dict[str, float]:
    """Parameters (trainable in float32 + frozen as the train state stores them), gradients and AdamW moments of
    one card, from shapes only (a QLoRA kernel is qwix's quantized values + float32 scales, nf4 packed)."""
    _, params, frozen = _abstract_state(cfg)
    trainable = sum(int(np.prod(v.shape)) for v in params.values())
    return {"params": 4 * trainable + _bytes(frozen), "grads": 4 * trainable, "adam": 8 * trainable}


def single_card_table(validate: bool = False) -> None:
    """Training state of one card per mode, the LLM's activations at batch 1 / 2 / 4 (:func:`training_activations`)
    and, per card size, the largest of those batches whose state + activations fit."""
    gib = 2 ** 30
    measured = {name: training_activations(lora, qtype) for name, lora, qtype in ACTIVATION_PROGRAMS}
    print_activation_table(measured)
    if validate:
        validate_extrapolation(measured)
    batches = " / ".join(map(str, TRAIN_BATCHES))
    print(f"\n| single card | params | grads | Adam m+v | state total | LLM activations, batch {batches} | "
          f"total, batch {batches} | fits 24 / 48 / 80 GB: largest batch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, lora, qtype in SINGLE_CARD:
        b = single_card_bytes(single_card_config(lora, qtype))
        state = sum(b.values())
        acts = measured[FULL_PROGRAM if lora is None else LORA_PROGRAM]
        totals = {n: state + acts[n]["bytes"] for n in TRAIN_BATCHES}
        fits = " / ".join(str(max((n for n, t in totals.items() if t < hbm * 1e9), default="none"))
                          for hbm in CARDS_GB)
        act_text = " / ".join(f"{acts[n]['bytes'] / gib:.2f}" for n in TRAIN_BATCHES)
        total_text = " / ".join(f"{t / gib:.2f}" for t in totals.values())
        print(f"| {name} | {b['params'] / gib:.2f} GiB | {b['grads'] / gib:.2f} GiB | {b['adam'] / gib:.2f} GiB | "
              f"{state / gib:.2f} GiB | {act_text} GiB | **{total_text} GiB** | {fits} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validate", action="store_true",
                        help="also compile the training programs at full depth to check the extrapolation")
    args = parser.parse_args()
    main()
    single_card_table(args.validate)
