"""Benchmark multi-scale deformable attention at SegLLM sizes.

For every implementation asked for (default: what the backend has; CPU: the blocked XLA path,
the dense XLA reference and the PyTorch peer; GPU: XLA and the Triton kernel; TPU: XLA and the
Mosaic kernel) it times the forward pass and forward+backward (median of ``--iters``
device-synchronised runs after ``--warmup``), and reports milliseconds, achieved GB/s under a
minimal-traffic model (every input read once, every output written once; the gathers' re-reads
of value rows are not counted, so this is a lower bound) and that bandwidth as a fraction of a
memory roofline measured in the same run with a large elementwise copy (and, with
``--peak-gbps``, of the card's nominal bandwidth).

The PyTorch peer (``--impls torch``) is ``transformers``' ``MultiScaleDeformableAttention``, the
module ``DeformableDetrModel`` runs (``grid_sample`` per level; on CUDA as well), on the same
inputs; ``--torch-device cuda`` puts it on the GPU.  ``--threads N`` pins the process to N CPUs
and sets PyTorch's thread count, so both frameworks use the same cores.

Sizes (1024x1024 image -> levels 128^2, 64^2, 32^2, 16^2, S = 21,760; H=8, Dh=32, L=4, P=4):
encoder self-attention Q = S with B in {1, 2, 8}; decoder cross-attention Q in {110, 900}
(HIPIE's 100 + 10 queries; Deformable-DETR's 900) with B = 2 and B = 8 (``dec_q110_b8``: one
image, 8 prompts).  ``--quick`` scales the levels down 4x per side (S = 1,360) for smoke runs.
``--dtype bfloat16`` runs value / weights / output in bf16 (locations stay float32, as in HIPIE).

``--tpu-visits`` prints, instead of timings, how many (query block, value tile) pairs the TPU
kernel visits at these sizes, counted by evaluating its own index maps
(``pallas_kernels.ms_deform_attn.tpu.visit_stats``), for the benchmark's inputs and for
Deformable-DETR's initial offset grid (what a HIPIE with untrained offsets samples).

    python benchmarks/ms_deform_attn.py                 # all sizes, all impls
    python benchmarks/ms_deform_attn.py --quick         # small sizes
    python benchmarks/ms_deform_attn.py --sizes enc_b2 dec_q900 --impls xla pallas
    python benchmarks/ms_deform_attn.py --tpu-visits
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

HEADS, HEAD_DIM, POINTS = 8, 32, 4
FULL_LEVELS = ((128, 128), (64, 64), (32, 32), (16, 16))
QUICK_LEVELS = ((32, 32), (16, 16), (8, 8), (4, 4))
SMOKE_LEVELS = ((8, 8), (4, 4), (2, 2), (1, 1))


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
    "dec_q110_b8": Size("dec_q110_b8", 8, 110),
    "dec_q900": Size("dec_q900", 2, 900),
}
QUICK_SIZES = ("enc_b1", "enc_b2", "dec_q110")


def starts_of(levels) -> tuple[int, ...]:
    return tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in levels])[:-1])


def make_inputs(size: Size, levels: tuple[tuple[int, int], ...], seed: int = 0, offsets: str = "gaussian"):
    """Random value and realistic sampling locations: a reference point plus a few pixels of offset.

    ``offsets="gaussian"``: N(0, 2 px) per level, isotropic; ``"detr_init"``: Deformable-DETR's
    initial grid (head m along angle 2*pi*m/M, point p at p+1 px; what untrained offsets give).
    Float32 NumPy arrays ``value [B, S, H, Dh]``, ``loc [B, Q, H, L, P, 2]``, ``aw [B, Q, H, L, P]``.
    """
    rng = np.random.default_rng(seed)
    seq = sum(h * w for h, w in levels)
    queries = seq if size.queries is None else size.queries
    if size.queries is None:
        # Encoder: each query is a pixel of some level; its reference point is that pixel's centre.
        centres = [np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h) for h, w in levels]
        ref = np.concatenate([np.stack(xy, -1).reshape(-1, 2) for xy in centres])
    else:
        ref = rng.uniform(0.05, 0.95, (queries, 2))
    wh = np.array([[w, h] for h, w in levels], np.float32)  # [L, 2]
    if offsets == "gaussian":
        pixels = rng.normal(0.0, 2.0, (size.batch, queries, HEADS, len(levels), POINTS, 2))
    else:
        angle = 2 * np.pi * np.arange(HEADS) / HEADS
        direction = np.stack([np.cos(angle), np.sin(angle)], -1)
        direction /= np.abs(direction).max(-1, keepdims=True)  # [H, 2]
        radius = np.arange(1, POINTS + 1, dtype=np.float64)  # [P]
        grid = direction[:, None, None, :] * radius[None, None, :, None]  # [H, 1, P, 2]
        pixels = np.broadcast_to(grid, (size.batch, queries, HEADS, len(levels), POINTS, 2))
    loc = (ref[None, :, None, None, None, :] + pixels / wh[:, None, :]).astype(np.float32)
    logits = rng.standard_normal((size.batch, queries, HEADS, len(levels) * POINTS))
    aw = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    value = rng.standard_normal((size.batch, seq, HEADS, HEAD_DIM)).astype(np.float32)
    return value, loc, aw.reshape(size.batch, queries, HEADS, len(levels), POINTS).astype(np.float32)


def traffic_bytes(value, loc, aw, backward: bool, itemsize: int) -> int:
    """Minimal memory traffic: forward reads value/loc/aw and writes out; backward also reads
    dout and the inputs again and writes a gradient of each input.  ``itemsize`` of value, aw
    and out (locations stay float32)."""
    out = loc.shape[0] * loc.shape[1] * HEADS * HEAD_DIM * itemsize
    inputs = value.size * itemsize + loc.size * 4 + aw.size * itemsize
    fwd = inputs + out
    return fwd + (out + 2 * inputs if backward else 0)


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
    import jax
    import jax.numpy as jnp

    n = (256 if jax.default_backend() != "cpu" else 32) * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    ms = median_ms(lambda: copy(x), jax.block_until_ready, warmup, iters)
    return 2 * x.nbytes / ms / 1e6


def jax_fns(impl: str, levels, value, loc, aw, dtype: str = "float32"):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import ms_deform_attn

    starts = starts_of(levels)
    # locations stay float32 (they address pixels of up to 128-wide maps)
    args = [jnp.asarray(value, dtype), jnp.asarray(loc), jnp.asarray(aw, dtype)]
    fwd = jax.jit(lambda v, loc, a: ms_deform_attn(v, levels, starts, loc, a, impl=impl))
    cot = jnp.ones((loc.shape[0], loc.shape[1], HEADS * HEAD_DIM), dtype)
    bwd = jax.jit(
        jax.grad(lambda v, loc, a: jnp.vdot(ms_deform_attn(v, levels, starts, loc, a, impl=impl), cot),
                 argnums=(0, 1, 2))
    )
    return (lambda: fwd(*args)), (lambda: bwd(*args)), jax.block_until_ready


def torch_fns(levels, value, loc, aw, dtype: str = "float32", device: str = "cpu"):
    """The peer: ``transformers``' ``MultiScaleDeformableAttention`` (Deformable-DETR's module)."""
    import torch
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    peer = MultiScaleDeformableAttention()
    shapes_list = [tuple(s) for s in levels]
    shapes = torch.tensor(shapes_list, dtype=torch.long, device=device)
    starts = torch.tensor(starts_of(levels), dtype=torch.long, device=device)
    # grid_sample wants value and grid in one dtype: locations follow value here
    tdtype = getattr(torch, dtype)
    tv, tl, ta = (torch.from_numpy(x).to(device=device, dtype=tdtype) for x in (value, loc, aw))
    sync = (lambda out: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda out: out)

    def run(v, loc, a):
        return peer(v, shapes, shapes_list, starts, loc, a, im2col_step=64)

    def fwd():
        with torch.no_grad():
            return run(tv, tl, ta)

    def fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (tv, tl, ta)]
        run(*leaves).sum().backward()
        return [x.grad for x in leaves]

    return fwd, fwd_bwd, sync


def default_impls() -> list[str]:
    import jax

    backend = jax.default_backend()
    return {"cpu": ["xla", "xla_dense", "torch"], "gpu": ["xla", "pallas"], "tpu": ["xla", "pallas"]}.get(
        backend, ["xla"])


def measure(size: Size, levels, impls: list[str], dtype: str, passes: tuple[str, ...], warmup: int, iters: int,
            torch_device: str = "cpu") -> list[dict]:
    """One row per (impl, pass): ms, GB/s (minimal-traffic model) and time relative to the XLA path."""
    value, loc, aw = make_inputs(size, levels)
    itemsize = 2 if dtype == "bfloat16" else 4
    rows, baseline = [], {}
    for impl in impls:
        if impl == "torch":
            fns = torch_fns(levels, value, loc, aw, dtype, torch_device)
        else:
            fns = jax_fns(impl, levels, value, loc, aw, dtype)
        for name, fn in zip(passes, fns[:2], strict=False):  # --forward-only: the first pass only
            ms = median_ms(fn, fns[2], warmup, iters)
            if impl == "xla":
                baseline[name] = ms
            rows.append({"size": size.name, "batch": size.batch, "queries": loc.shape[1], "impl": impl,
                         "dtype": dtype, "pass": name, "ms": ms,
                         "gbps": traffic_bytes(value, loc, aw, name != "fwd", itemsize) / ms / 1e6,
                         "vs_xla": baseline[name] / ms if name in baseline else None})
    return rows


def tpu_visit_report(levels, sizes: list[Size]) -> list[str]:
    """Markdown rows: the TPU kernel's visited (query block, value tile) pairs vs visiting all of them."""
    from pallas_kernels.ms_deform_attn import tpu

    lines = ["| size | offsets | block_q x block_s | visited pairs | all pairs (before) | fraction |",
             "|---|---|---|---|---|---|"]
    seq = sum(h * w for h, w in levels)
    for size in sizes:
        for offsets in ("gaussian", "detr_init"):
            _, loc, _ = make_inputs(size, levels, offsets=offsets)
            stats = tpu.visit_stats(loc, levels, starts_of(levels), seq)
            lines.append(f"| {size.name} (B={size.batch}, Q={loc.shape[1]}) | {offsets} | {stats['block_q']} x "
                         f"{stats['block_s']} | {stats['visited']:,} | {stats['dense']:,} | "
                         f"{stats['visited'] / stats['dense']:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="default: all (or the --quick set)")
    parser.add_argument("--impls", nargs="+", choices=["xla", "xla_dense", "pallas", "pallas_gpu", "pallas_tpu",
                                                        "torch"])
    parser.add_argument("--quick", action="store_true", help="levels 32^2..4^2 instead of 128^2..16^2")
    parser.add_argument("--smoke", action="store_true", help="levels 8^2..1^2: checks that the code runs")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="pin to this many CPUs (both frameworks)")
    parser.add_argument("--torch-device", default="cpu", help="cpu or cuda")
    parser.add_argument("--peak-gbps", type=float, default=None, help="the card's nominal bandwidth, GB/s")
    parser.add_argument("--tpu-visits", action="store_true", help="count the TPU kernel's visited tile pairs")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", default=None, help="also write the rows (and the roofline) here as JSON")
    args = parser.parse_args()
    if args.threads:
        os.sched_setaffinity(0, range(args.threads))
        import torch

        torch.set_num_threads(args.threads)

    levels = SMOKE_LEVELS if args.smoke else QUICK_LEVELS if args.quick else FULL_LEVELS
    sizes = [SIZES[s] for s in (args.sizes or (QUICK_SIZES if args.quick or args.smoke else SIZES))]
    if args.tpu_visits:
        print(f"TPU kernel visits, levels {levels}")
        print("\n".join(tpu_visit_report(levels, sizes)))
        return

    import jax

    impls = args.impls or default_impls()
    roof = roofline_gbps(args.warmup, args.iters)
    threads = len(os.sched_getaffinity(0))
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} levels={levels} "
          f"H={HEADS} Dh={HEAD_DIM} P={POINTS} dtype={'/'.join(args.dtype)} cpus={threads} "
          f"roofline(copy)={roof:.1f} GB/s"
          + (f" nominal={args.peak_gbps:.0f} GB/s" if args.peak_gbps else ""))
    passes = ("fwd",) if args.forward_only else ("fwd", "fwd+bwd")
    rows = []
    if args.markdown:
        print("\n".join(markdown_table([], roof, args.peak_gbps)))
    else:
        header = (f"{'size':<11} {'B':>2} {'Q':>6} {'impl':<10} {'pass':<8} {'ms':>9} {'GB/s':>8} {'%roof':>6}"
                  + (f" {'%peak':>6}" if args.peak_gbps else "") + f" {'vs xla':>7}")
        print(header)
        print("-" * len(header))
    for dtype, size in ((d, z) for d in args.dtype for z in sizes):
        for r in measure(size, levels, impls, dtype, passes, args.warmup, args.iters, args.torch_device):
            rows.append(r)
            if args.markdown:
                print(markdown_table([r], roof, args.peak_gbps)[2], flush=True)
                continue
            ratio = f"{r['vs_xla']:6.2f}x" if r["vs_xla"] is not None else "      -"
            peak = f" {100 * r['gbps'] / args.peak_gbps:5.1f}%" if args.peak_gbps else ""
            print(f"{r['size']:<11} {r['batch']:>2} {r['queries']:>6} {r['impl']:<10} {r['pass']:<8} {r['ms']:9.3f} "
                  f"{r['gbps']:8.2f} {100 * r['gbps'] / roof:5.1f}%{peak} {ratio}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "roofline_gbps": roof, "rows": rows}, f)
    print("'vs xla' = XLA-path time / this impl's time (>1: faster than the XLA path).")


def markdown_table(rows: list[dict], roof: float, peak_gbps: float | None) -> list[str]:
    """Header + one line per row of :func:`measure`."""
    out = ["| size | B | Q | impl | dtype | pass | ms | GB/s | % of copy roofline | % of nominal | vs xla |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nominal = f"{100 * r['gbps'] / peak_gbps:.1f}%" if peak_gbps else "—"
        ratio = f"{r['vs_xla']:.2f}x" if r["vs_xla"] is not None else "—"
        out.append(f"| {r['size']} | {r['batch']} | {r['queries']} | {r['impl']} | {r['dtype']} | {r['pass']} | "
                   f"{r['ms']:.3f} | {r['gbps']:.1f} | {100 * r['gbps'] / roof:.1f}% | {nominal} | {ratio} |")
    return out


if __name__ == "__main__":
    main()
