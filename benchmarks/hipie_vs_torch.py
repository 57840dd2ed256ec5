"""HIPIE's deformable encoder stack (JAX) against transformers' Deformable-DETR encoder (PyTorch).

    python benchmarks/hipie_vs_torch.py                          # batch 1 and 8, fwd and fwd+bwd, 1024 px
    python benchmarks/hipie_vs_torch.py --batch 1 --passes fwd --size 512 --out table.md

The two stacks are the same computation: 6 post-norm layers of multi-scale deformable
self-attention (d_model 256, 8 heads, 4 levels, 4 points) + a ReLU FFN of HIPIE's width (2048),
over the four levels of a ``--size`` input (strides 8/16/32/64: 128², 64², 32², 16² at 1024 px,
S = 21,760 tokens).  Ours is ``segllm_jax.models.hipie.encoder.DeformableEncoder`` with
``msda_impl="xla"``; the peer is ``transformers``' ``DeformableDetrEncoder`` (the encoder of
``DeformableDetrModel``) built from a ``DeformableDetrConfig`` with the same sizes.

* **Same weights**: one NumPy parameter set (seeded) is loaded into both (kernels transposed for
  ``nn.Linear``); the sampling-offset and attention-weight projections get small random kernels on
  top of Deformable-DETR's initial offset grid, so every query samples a few pixels around itself.
* **Same inputs**: seeded NumPy features and position embeddings, float32, no padding.
* **Same threads**: every worker pins itself to the first ``--threads`` CPUs before importing its
  framework and sets ``torch.set_num_threads`` (XLA sizes its pool from the affinity mask).
* **Separate processes**: each (framework, batch, pass) runs in a fresh worker process that imports
  only its own framework; it reports the median of ``--runs`` timed runs after one warm-up (JAX:
  compile included in the warm-up) and its peak RSS (``ru_maxrss``), plus the RSS just before the
  first run (imports, weights and inputs), so both the absolute peak and the growth are visible.
* **Parity check**: the batch-1 forward outputs of both workers are compared (max relative error).

``fwd+bwd`` is the gradient of ``sum(out * cotangent)`` w.r.t. every parameter and the input
features (PyTorch: ``out.backward(cot)`` with ``requires_grad`` input; JAX: ``nnx.grad``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D_MODEL, HEADS, LEVELS, POINTS, FFN, LAYERS = 256, 8, 4, 4, 2048, 6
STRIDES = (8, 16, 32, 64)


def level_shapes(size: int) -> tuple[tuple[int, int], ...]:
    return tuple((-(-size // s), -(-size // s)) for s in STRIDES)


def offset_grid_bias() -> np.ndarray:
    """Deformable-DETR's initial sampling offsets (head m along angle 2*pi*m/M, point p at radius p+1)."""
    from segllm_jax.models.hipie.deformable_attention import _offset_grid_bias

    return _offset_grid_bias(HEADS, LEVELS, POINTS)


def encoder_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """One parameter set, keyed by our NNX paths (kernels ``[in, out]``)."""
    rng = np.random.default_rng(seed)

    def uniform(fan_in: int, shape: tuple[int, ...]) -> np.ndarray:  # nn.Linear's default init
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    mlp = HEADS * LEVELS * POINTS
    for i in range(LAYERS):
        p = f"layers.{i}."
        # offsets: the initial grid plus ~0.2 px of input-dependent spread; attention logits of O(0.3)
        w[p + "self_attn.sampling_offsets.kernel"] = rng.normal(0, 0.01, (D_MODEL, 2 * mlp)).astype(np.float32)
        w[p + "self_attn.sampling_offsets.bias"] = offset_grid_bias()
        w[p + "self_attn.attention_weights.kernel"] = rng.normal(0, 0.02, (D_MODEL, mlp)).astype(np.float32)
        w[p + "self_attn.attention_weights.bias"] = np.zeros((mlp,), np.float32)
        for name in ("value_proj", "output_proj"):
            w[p + f"self_attn.{name}.kernel"] = uniform(D_MODEL, (D_MODEL, D_MODEL))
            w[p + f"self_attn.{name}.bias"] = uniform(D_MODEL, (D_MODEL,))
        w[p + "linear1.kernel"] = uniform(D_MODEL, (D_MODEL, FFN))
        w[p + "linear1.bias"] = uniform(D_MODEL, (FFN,))
        w[p + "linear2.kernel"] = uniform(FFN, (FFN, D_MODEL))
        w[p + "linear2.bias"] = uniform(FFN, (D_MODEL,))
        for norm in ("norm1", "norm2"):
            w[p + f"{norm}.scale"] = (1.0 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
            w[p + f"{norm}.bias"] = (0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
    return w


# our NNX path suffix -> (transformers path suffix, transpose?)
_TORCH_NAMES = {
    "self_attn.sampling_offsets.kernel": ("self_attn.sampling_offsets.weight", True),
    "self_attn.sampling_offsets.bias": ("self_attn.sampling_offsets.bias", False),
    "self_attn.attention_weights.kernel": ("self_attn.attention_weights.weight", True),
    "self_attn.attention_weights.bias": ("self_attn.attention_weights.bias", False),
    "self_attn.value_proj.kernel": ("self_attn.value_proj.weight", True),
    "self_attn.value_proj.bias": ("self_attn.value_proj.bias", False),
    "self_attn.output_proj.kernel": ("self_attn.output_proj.weight", True),
    "self_attn.output_proj.bias": ("self_attn.output_proj.bias", False),
    "norm1.scale": ("self_attn_layer_norm.weight", False),
    "norm1.bias": ("self_attn_layer_norm.bias", False),
    "linear1.kernel": ("mlp.fc1.weight", True),
    "linear1.bias": ("mlp.fc1.bias", False),
    "linear2.kernel": ("mlp.fc2.weight", True),
    "linear2.bias": ("mlp.fc2.bias", False),
    "norm2.scale": ("final_layer_norm.weight", False),
    "norm2.bias": ("final_layer_norm.bias", False),
}


def torch_state_dict(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for path, array in weights.items():
        layer, suffix = path.split(".", 2)[1], path.split(".", 2)[2]
        name, transpose = _TORCH_NAMES[suffix]
        out[f"layers.{layer}.{name}"] = np.ascontiguousarray(array.T if transpose else array)
    return out


def encoder_inputs(batch: int, size: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = sum(h * w for h, w in level_shapes(size))
    return {
        "x": rng.standard_normal((batch, seq, D_MODEL)).astype(np.float32),
        "pos": rng.standard_normal((batch, seq, D_MODEL)).astype(np.float32),
        "cot": rng.standard_normal((batch, seq, D_MODEL)).astype(np.float32),
    }


def _rss_mb() -> float:
    """Current resident set size (MiB) from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _median_s(fn, runs: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_worker(batch: int, size: int, backward: bool, runs: int, save: str | None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segllm_jax.config import HipieConfig
    from segllm_jax.models.hipie.encoder import DeformableEncoder

    cfg = HipieConfig.hipie_r50_segllm()
    assert (cfg.d_model, cfg.num_heads, cfg.num_feature_levels, cfg.enc_points, cfg.ffn_dim, cfg.enc_layers) == (
        D_MODEL, HEADS, LEVELS, POINTS, FFN, LAYERS)
    cfg = dataclasses.replace(cfg, msda_impl="xla")
    model = DeformableEncoder(cfg, rngs=nnx.Rngs(0))
    for path, array in encoder_weights().items():
        node = model
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        assert node.shape == array.shape, path
        node.set_value(jnp.asarray(array))
    shapes = level_shapes(size)
    inputs = {k: jnp.asarray(v) for k, v in encoder_inputs(batch, size).items()}
    ratios = jnp.ones((batch, LEVELS, 2), jnp.float32)

    @nnx.jit
    def forward(m, x, pos):
        return m(x, pos, shapes, ratios)

    @nnx.jit
    def forward_backward(m, x, pos, cot):
        def loss(m, x):
            return jnp.sum(m(x, pos, shapes, ratios) * cot)

        return nnx.grad(loss, argnums=(0, 1))(m, x)

    def fn():
        if backward:
            return jax.block_until_ready(forward_backward(model, inputs["x"], inputs["pos"], inputs["cot"]))
        return jax.block_until_ready(forward(model, inputs["x"], inputs["pos"]))

    before = _rss_mb()
    seconds = _median_s(fn, runs)
    if save and not backward:
        np.save(save, np.asarray(forward(model, inputs["x"], inputs["pos"])))
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": _peak_rss_mb(),
            "version": f"jax {jax.__version__}"}


def torch_worker(batch: int, size: int, backward: bool, runs: int, save: str | None, threads: int) -> dict:
    import torch
    import transformers
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrEncoder

    torch.set_num_threads(threads)
    config = DeformableDetrConfig(
        d_model=D_MODEL, encoder_layers=LAYERS, encoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        num_feature_levels=LEVELS, encoder_n_points=POINTS, activation_function="relu", dropout=0.0,
        activation_dropout=0.0, attention_dropout=0.0, disable_custom_kernels=True,
    )
    encoder = DeformableDetrEncoder(config).eval()
    state = {k: torch.from_numpy(v) for k, v in torch_state_dict(encoder_weights()).items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("layers.")], (missing, unexpected)
    shapes = level_shapes(size)
    inputs = {k: torch.from_numpy(v) for k, v in encoder_inputs(batch, size).items()}
    spatial = torch.tensor(shapes, dtype=torch.long)
    starts = torch.tensor(np.cumsum([0] + [h * w for h, w in shapes])[:-1], dtype=torch.long)
    ratios = torch.ones((batch, LEVELS, 2), dtype=torch.float32)

    def run(x):
        return encoder(inputs_embeds=x, attention_mask=None, spatial_position_embeddings=inputs["pos"],
                       spatial_shapes=spatial, spatial_shapes_list=list(shapes), level_start_index=starts,
                       valid_ratios=ratios).last_hidden_state

    def forward():
        with torch.no_grad():
            return run(inputs["x"])

    def forward_backward():
        encoder.zero_grad(set_to_none=True)
        x = inputs["x"].clone().requires_grad_()
        run(x).backward(inputs["cot"])
        return x.grad

    before = _rss_mb()
    seconds = _median_s(forward_backward if backward else forward, runs)
    if save and not backward:
        np.save(save, forward().numpy())
    return {"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": _peak_rss_mb(),
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}"}


def worker(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, range(args.threads))
    backward = args.pass_ == "fwd+bwd"
    if args.framework == "jax":
        result = jax_worker(args.batch[0], args.size, backward, args.runs, args.save)
    else:
        result = torch_worker(args.batch[0], args.size, backward, args.runs, args.save, args.threads)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(framework: str, batch: int, pass_: str, args: argparse.Namespace, save: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--batch", str(batch), "--passes", pass_,
           "--size", str(args.size), "--runs", str(args.runs), "--threads", str(args.threads)]
    if save:
        cmd += ["--save", save]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' / '.join(tail)}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="input side in pixels (levels at strides 8..64)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--worker", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.framework, args.pass_ = args.worker, args.passes[0]
        worker(args)
        return

    shapes = level_shapes(args.size)
    lines = [
        f"machine: {platform.node()} ({platform.processor() or platform.machine()}), {args.threads} threads "
        f"for both frameworks, float32, size {args.size} -> levels {shapes} (S = {sum(h * w for h, w in shapes)})",
        "",
        "| batch | pass | JAX s | PyTorch s | JAX / PyTorch time | JAX peak RSS MiB (before run) | "
        "PyTorch peak RSS MiB (before run) | JAX / PyTorch peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    versions: set[str] = set()
    parity = None
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            for pass_ in args.passes:
                saves = {fw: (f"{tmp}/{fw}.npy" if batch == args.batch[0] and pass_ == "fwd" else None)
                         for fw in ("jax", "torch")}
                res = {fw: run_worker(fw, batch, pass_, args, saves[fw]) for fw in ("jax", "torch")}
                versions |= {r["version"] for r in res.values() if "version" in r}
                line = _row(batch, pass_, res["jax"], res["torch"])
                lines.append(line)
                print(line, flush=True)
                if all(s and os.path.exists(s) for s in saves.values()):
                    ours, peer = np.load(saves["jax"]), np.load(saves["torch"])
                    parity = float(np.abs(ours - peer).max() / np.abs(peer).max())
    lines += ["", f"versions: {', '.join(sorted(versions))}"]
    if parity is not None:
        lines.append(f"parity: batch-{args.batch[0]} forward outputs differ by {parity:.2e} (max abs / max |peer|)")
    print("\n".join(lines[-2:]))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def _row(batch: int, pass_: str, ours: dict, peer: dict) -> str:
    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else f"failed ({r['error']})"

    ratio_t = f"{ours['seconds'] / peer['seconds']:.2f}x" if "seconds" in ours and "seconds" in peer else "—"
    ratio_m = (f"{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x" if "peak_rss_mb" in ours and "peak_rss_mb" in peer
               else "—")

    def mem(r: dict) -> str:
        return f"{r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f})" if "peak_rss_mb" in r else f"failed ({r['error']})"

    return (f"| {batch} | {pass_} | {cell(ours, 'seconds', '.3f')} | {cell(peer, 'seconds', '.3f')} | {ratio_t} | "
            f"{mem(ours)} | {mem(peer)} | {ratio_m} |")


if __name__ == "__main__":
    main()
