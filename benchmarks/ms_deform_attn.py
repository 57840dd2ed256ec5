"""Benchmark multi-scale deformable attention at SegLLM sizes.

For every implementation available on the current backend (CPU: the XLA
reference and transformers' PyTorch ``grid_sample`` MSDA; GPU: XLA and the
Triton kernel; TPU: XLA and the Mosaic kernel) it times the forward pass and
forward+backward (median of ``--iters`` device-synchronised runs after
``--warmup``), and reports milliseconds, achieved GB/s under a minimal-traffic
model (every input read once, every output written once; the gathers'
re-reads of value rows are not counted, so this is a lower bound) and that
bandwidth as a fraction of a memory roofline measured in the same run with a
large device-to-device elementwise copy.

Sizes (1024x1024 image -> levels 128^2, 64^2, 32^2, 16^2, S = 21,760; H=8,
Dh=32, L=4, P=4): encoder self-attention Q = S with B in {1, 2, 8}, decoder
cross-attention Q in {110, 900}.  ``--quick`` scales the levels down 4x per
side (S = 1,360) for smoke runs on CPU.

    python benchmarks/ms_deform_attn.py                 # all sizes, all impls
    python benchmarks/ms_deform_attn.py --quick         # small sizes
    python benchmarks/ms_deform_attn.py --sizes enc_b2 dec_q900 --impls xla pallas
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ms_deform_attn

HEADS, HEAD_DIM, POINTS = 8, 32, 4
FULL_LEVELS = ((128, 128), (64, 64), (32, 32), (16, 16))
QUICK_LEVELS = ((32, 32), (16, 16), (8, 8), (4, 4))


@dataclass(frozen=True)
class Size:
    name: str
    batch: int
    queries: int | None  # None: encoder, Q = S


SIZES = {
    "enc_b1": Size("enc_b1", 1, None),
    "enc_b2": Size("enc_b2", 2, None),
    "enc_b8": Size("enc_b8", 8, None),
    "dec_q110": Size("dec_q110", 2, 110),
    "dec_q900": Size("dec_q900", 2, 900),
}
QUICK_SIZES = ("enc_b1", "enc_b2", "dec_q110")


def make_inputs(size: Size, levels: tuple[tuple[int, int], ...], seed: int = 0):
    """Random value and realistic sampling locations (reference point + a few pixels of offset)."""
    rng = np.random.default_rng(seed)
    seq = sum(h * w for h, w in levels)
    queries = seq if size.queries is None else size.queries
    if size.queries is None:
        # Encoder: each query is a pixel of some level; its reference point is that pixel's centre.
        ref = np.concatenate(
            [np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h), -1).reshape(-1, 2) for h, w in levels]
        )
    else:
        ref = rng.uniform(0.05, 0.95, (queries, 2))
    wh = np.array([[w, h] for h, w in levels], np.float32)  # [L, 2]
    offsets = rng.normal(0.0, 2.0, (size.batch, queries, HEADS, len(levels), POINTS, 2)) / wh[:, None, :]
    loc = (ref[None, :, None, None, None, :] + offsets).astype(np.float32)
    logits = rng.standard_normal((size.batch, queries, HEADS, len(levels) * POINTS))
    aw = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    value = rng.standard_normal((size.batch, seq, HEADS, HEAD_DIM)).astype(np.float32)
    return value, loc, aw.reshape(size.batch, queries, HEADS, len(levels), POINTS).astype(np.float32)


def traffic_bytes(value, loc, aw, backward: bool) -> int:
    """Minimal HBM traffic: forward reads value/loc/aw and writes out; backward also reads
    dout and the inputs again and writes a gradient of each input."""
    out = loc.shape[0] * loc.shape[1] * HEADS * HEAD_DIM * 4
    fwd = value.nbytes + loc.nbytes + aw.nbytes + out
    return fwd + (out + 2 * (value.nbytes + loc.nbytes + aw.nbytes) if backward else 0)


def median_ms(fn: Callable[[], object], sync: Callable[[object], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def roofline_gbps(warmup: int, iters: int) -> float:
    """Device memory bandwidth from a large elementwise copy (read + write)."""
    n = (256 if jax.default_backend() != "cpu" else 32) * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    ms = median_ms(lambda: copy(x), jax.block_until_ready, warmup, iters)
    return 2 * x.nbytes / ms / 1e6


def jax_fns(impl: str, levels, value, loc, aw):
    starts = tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in levels])[:-1])
    args = [jnp.asarray(x) for x in (value, loc, aw)]
    fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, levels, starts, l, a, impl=impl))
    cot = jnp.ones((loc.shape[0], loc.shape[1], HEADS * HEAD_DIM), jnp.float32)
    bwd = jax.jit(
        jax.grad(lambda v, l, a: jnp.vdot(ms_deform_attn(v, levels, starts, l, a, impl=impl), cot), argnums=(0, 1, 2))
    )
    return (lambda: fwd(*args)), (lambda: bwd(*args)), jax.block_until_ready


def torch_fns(levels, value, loc, aw):
    import torch
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    shapes = [tuple(s) for s in levels]
    tv, tl, ta = (torch.from_numpy(x) for x in (value, loc, aw))

    def fwd():
        with torch.no_grad():
            return multi_scale_deformable_attention(tv, shapes, tl, ta)

    def fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (tv, tl, ta)]
        multi_scale_deformable_attention(leaves[0], shapes, leaves[1], leaves[2]).sum().backward()
        return [x.grad for x in leaves]

    return fwd, fwd_bwd, lambda out: out


def default_impls() -> list[str]:
    backend = jax.default_backend()
    return {"cpu": ["xla", "torch"], "gpu": ["xla", "pallas"], "tpu": ["xla", "pallas"]}.get(backend, ["xla"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="default: all (or the --quick set)")
    parser.add_argument("--impls", nargs="+", choices=["xla", "pallas", "pallas_gpu", "pallas_tpu", "torch"])
    parser.add_argument("--quick", action="store_true", help="levels 32^2..4^2 instead of 128^2..16^2")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args()

    levels = QUICK_LEVELS if args.quick else FULL_LEVELS
    sizes = [SIZES[s] for s in (args.sizes or (QUICK_SIZES if args.quick else SIZES))]
    impls = args.impls or default_impls()
    roof = roofline_gbps(args.warmup, args.iters)
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} levels={levels} "
          f"H={HEADS} Dh={HEAD_DIM} P={POINTS} roofline(copy)={roof:.1f} GB/s")
    header = f"{'size':<9} {'B':>2} {'Q':>6} {'impl':<10} {'pass':<8} {'ms':>9} {'GB/s':>8} {'%roof':>6} {'vs xla':>7}"
    print(header)
    print("-" * len(header))
    passes = ("fwd",) if args.forward_only else ("fwd", "fwd+bwd")
    for size in sizes:
        value, loc, aw = make_inputs(size, levels)
        baseline: dict[str, float] = {}
        for impl in impls:
            fwd, fwd_bwd, sync = torch_fns(levels, value, loc, aw) if impl == "torch" else jax_fns(
                impl, levels, value, loc, aw
            )
            for name, fn in zip(passes, (fwd, fwd_bwd)):
                ms = median_ms(fn, sync, args.warmup, args.iters)
                gbps = traffic_bytes(value, loc, aw, name != "fwd") / ms / 1e6
                if impl == "xla":
                    baseline[name] = ms
                ratio = f"{baseline[name] / ms:6.2f}x" if name in baseline else "      -"
                print(f"{size.name:<9} {size.batch:>2} {loc.shape[1]:>6} {impl:<10} {name:<8} {ms:9.3f} "
                      f"{gbps:8.2f} {100 * gbps / roof:5.1f}% {ratio}")
    print("'vs xla' = XLA-reference time / this impl's time (>1: faster than the reference).")


if __name__ == "__main__":
    main()
