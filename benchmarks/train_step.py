"""Training-step throughput: step time, tokens/s and model-FLOPs utilisation (MFU).

    python benchmarks/train_step.py --preset tiny                 # CPU: the tests' tiny config, with and without HIPIE
    python benchmarks/train_step.py --preset llama1b              # GPU: ~1B LLaMA + CLIP ViT-L/14 + real HIPIE, bf16
    python benchmarks/train_step.py --preset llama1b --dry-run    # anywhere: abstract build + compile, FLOPs only

One row per variant: the jitted ``train_step`` of ``segllm_jax.train.step`` (what ``segllm-jax train``
runs) on a fixed batch of MR-Shapes conversations, one untimed warm-up step, then the median of
``--steps`` timed steps.

* **FLOPs per step** are XLA's own count for the compiled step (``compiled.cost_analysis()["flops"]``):
  forward, backward and the AdamW update, *including* what remat recomputes (with ``remat="full"``
  the ratio is therefore nearer hardware- than model-FLOPs utilisation) and *excluding* work inside
  custom calls (cuDNN / Pallas kernels) and the host-side matching callback of the HIPIE term.
* **Peak**: on CPU a float32 matmul measured in the same run (so MFU compares the step with the
  best this machine does on a plain matmul, on the same cores); on an H100 or H200 the dense bf16
  tensor-core peak, 989 TFLOP/s (``--peak-tflops`` for other cards).
* **tokens/s** counts real (non-padding) sequence tokens of the batch, not the supervised ones.

The ``llama1b`` preset: LLaMA with hidden 2048, 16 layers, 16 heads, FFN 5632 (0.95 B parameters),
CLIP ViT-L/14 at 224 px (frozen), HIPIE-R50 as SegLLM configures it at a 1024 px frame, bf16 compute
over float32 master weights, full remat: SegLLM's training step with a smaller LLM, sized for one
80 GB GPU. ``--dry-run`` builds the train state abstractly (``nnx.eval_shape``: nothing allocated)
and compiles the step, to check the preset anywhere and read its FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from segllm_jax.config import HipieConfig, LlamaConfig, SegLLMConfig, VisionConfig
from segllm_jax.data.mrshapes_prepare import prepare_tiny_mrshapes
from segllm_jax.sharding import make_mesh
from segllm_jax.tokenizer import SegTokenizer
from segllm_jax.train import batching as B
from segllm_jax.train import loop
from segllm_jax.train import step as S
from segllm_jax.train.config import TrainConfig, tiny_cpu

GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    cfg: TrainConfig


def llama1b_model(vocab_size: int, frame: int) -> SegLLMConfig:
    llm = LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_layers=16,
                      num_heads=16, num_kv_heads=16, head_dim=128)
    vision = VisionConfig.clip_vit_l14()
    return SegLLMConfig(llm, vision, HipieConfig.hipie_r50_segllm(), num_image_tokens=vision.num_patches,
                        hipie_image_size=frame)


def variants(preset: str, data: tuple[Any, str, int], batch_size: int, frame: int) -> list[Variant]:
    mixture, tokenizer_dir, vocab = data
    if preset == "tiny":
        cfg = tiny_cpu(mixture, tokenizer_dir, vocab, batch_size=batch_size)
        hipie = cfg.replace(use_hipie_loss=True)
        # the point-sampled mask losses' top-k over 3 x mask_points candidates dominates the tiny step at
        # the original's 12544 points; the learning-proof preset (mrshapes_cpu) samples 1024
        return [Variant("tiny, LM + prompt L2", cfg), Variant("tiny, + HIPIE term (12544 mask points)", hipie),
                Variant("tiny, + HIPIE term (1024 mask points)", hipie.replace(mask_points=1024))]
    model = llama1b_model(32011, frame)  # LLaVA's vocabulary; the MR-Shapes token ids are a subset
    cfg = TrainConfig(model=model, data=mixture, tokenizer_dir=tokenizer_dir, batch_size=batch_size,
                      pad_multiple=128, mesh_shape=(1, 1, 1), compute_dtype="bfloat16", remat="full",
                      use_hipie_loss=True)
    return [Variant(f"llama1b + ViT-L/14-224 + HIPIE-R50 @{frame}, bf16", cfg)]


def first_batch(cfg: TrainConfig) -> B.TrainBatch:
    pipeline = loop.make_pipeline(cfg, SegTokenizer.from_pretrained(cfg.tokenizer_dir), num_epochs=1)
    iterator = iter(pipeline)
    try:
        return B.make_train_batch(next(iterator)["examples"], cfg, step=0)
    finally:
        iterator.close()


def peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
    """(FLOP/s, where the number comes from) of the first device."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_flops(), "float32 matmul measured in this run"
    for name, flops in GPU_PEAK_FLOPS.items():
        if name in device.device_kind:
            return flops, f"{name} dense bf16 peak"
    return None, f"unknown for {device.device_kind} (pass --peak-tflops)"


def measured_matmul_flops(n: int = 1024, repeats: int = 20) -> float:
    """Best float32 [n, n] @ [n, n] rate on the default device: the CPU's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def compiled_step(cfg: TrainConfig, state, batch):
    """(compiled step, FLOPs per step from XLA's cost analysis); ``state`` may be abstract."""
    structure = S.abstract_structure(cfg)
    term = loop._hipie_term(cfg)
    compiled = jax.jit(S.make_train_step(structure, cfg, term), donate_argnums=0).lower(state, batch).compile()
    return compiled, float(compiled.cost_analysis()["flops"])


def measure(cfg: TrainConfig, steps: int, dry_run: bool) -> dict[str, Any]:
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    batch = first_batch(cfg)
    structure = S.abstract_structure(cfg)
    tokens = int(np.asarray(batch.conv.token_mask).sum())
    row = {"batch": cfg.batch_size, "tokens": tokens, "length": int(batch.conv.input_ids.shape[1])}
    if dry_run:
        abstract = loop.abstract_train_state(structure, cfg, S.state_shardings(structure, cfg, mesh))
        t0 = time.perf_counter()
        _, row["flops"] = compiled_step(cfg, abstract, jax.tree.map(jnp.asarray, batch))
        row["compile_s"] = time.perf_counter() - t0
        return row
    state, _ = S.init_state(cfg, mesh, structure)
    batch = jax.device_put(batch, B.batch_shardings(batch, mesh))
    t0 = time.perf_counter()
    step, row["flops"] = compiled_step(cfg, state, batch)
    row["compile_s"] = time.perf_counter() - t0
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times)
    return row


def table(rows: list[tuple[str, dict[str, Any]]], peak: float | None) -> list[str]:
    out = ["| variant | batch × length | tokens/step | step ms | tokens/s | GFLOP/step (XLA) | TFLOP/s | MFU |",
           "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        gflop = r["flops"] / 1e9
        head = f"| {name} | {r['batch']} × {r['length']} | {r['tokens']} |"
        if "step_s" not in r:
            out.append(f"{head} — (dry run, compiled in {r['compile_s']:.0f} s) | — | {gflop:,.1f} | — | — |")
            continue
        rate = r["flops"] / r["step_s"]
        mfu = f"{rate / peak:.1%}" if peak else "—"
        out.append(f"{head} {r['step_s'] * 1e3:,.1f} | {r['tokens'] / r['step_s']:,.0f} | {gflop:,.1f} | "
                   f"{rate / 1e12:.4g} | {mfu} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "llama1b"], default="tiny")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--batch-size", type=int, default=None, help="conversations per step (tiny 2, llama1b 8)")
    parser.add_argument("--frame", type=int, default=1024, help="llama1b: HIPIE frame side")
    parser.add_argument("--dry-run", action="store_true", help="abstract state, compile only: FLOPs, no timing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device, in TFLOP/s")
    parser.add_argument("--data", default=None, help="MR-Shapes folder (default: a temporary one)")
    parser.add_argument("--variant", type=int, default=None, help="run only this row of the preset (0-based)")
    args = parser.parse_args()
    batch_size = args.batch_size or (2 if args.preset == "tiny" else 8)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_tiny_mrshapes(args.data or tmp, n_scenes=max(8, batch_size), seed=0)
        chosen = variants(args.preset, data, batch_size, args.frame)
        if args.variant is not None:
            chosen = chosen[args.variant : args.variant + 1]
        rows = [(v.name, measure(v.cfg, args.steps, args.dry_run)) for v in chosen]
    peak, source = (None, "dry run") if args.dry_run else peak_flops(args.peak_tflops)
    device = jax.devices()[0]
    print(f"backend={jax.default_backend()} device={device.device_kind} jax={jax.__version__} "
          f"peak={'—' if peak is None else f'{peak / 1e12:.4g} TFLOP/s'} ({source})")
    print("\n".join(table(rows, peak)))


if __name__ == "__main__":
    main()
