"""HIPIE forward cost per stage: backbone, encoder, decoder, mask head (random weights, jit).

    python benchmarks/hipie_forward.py [--size 1024] [--prompts 1 8] [--runs 5] [--warmup 1]
                                       [--msda-impl xla|xla_dense|pallas|...] [--compile-only] [--train]
                                       [--compare-unblocked]

Stages (each its own jitted function, timings device-synchronised with ``block_until_ready``):

* ``backbone``  per image: normalisation, ResNet-50, input projections, positions (architecture.md §O16);
* ``encoder``   per prompt batch: gather by image index, VL fusion, 6 deformable encoder layers;
* ``decoder``   two-stage selection, 6 decoder layers, last-layer heads, controller;
* ``mask head`` pixel branch (``mask_feats``), the selected query's dynamic conv,
  ``aligned_bilinear``, x4 upsampling to the input size and thresholding (host NMS excluded:
  well under a millisecond of NumPy).

Reported: median wall time of ``--runs`` runs after ``--warmup`` runs, each stage's share of the
sum, and the compiled program's memory (XLA ``memory_analysis``: outputs + temporaries, i.e.
what the stage allocates beyond its inputs and the 217 MiB of float32 weights) plus the device's
``peak_bytes_in_use`` where the backend reports it (GPU/TPU).  ``--msda-impl xla_dense`` runs the
all-queries-at-once deformable attention (the pre-blocking path) for before/after comparisons;
``--compile-only`` reports the memory without running anything (for sizes that would not fit).

``--train`` compiles (never runs) one training step's forward + backward instead: ``jax.value_and_grad``
of SegLLM's HIPIE loss (``segllm_jax.train.hipie_loss``: backbone, fusion with dropout, encoder, DN +
matching decoder, per-layer heads and masks, criterion) w.r.t. the parameters that train
(``segllm_jax.train.step.is_trainable``) and the prompts, for ``n`` prompts on one image; it reports
the temporaries and the outputs (the gradients, as big as the trainable weights) separately.

``--compare-unblocked`` times only the encoder stage, round by round over every prompt count and
both the model as configured and the same weights with the VL fusion and encoder FFN unblocked
(``token_block_bytes`` so large that one block holds every token: the computation before the token
blocks; ``--unblocked-prompts`` limits it to some prompt counts), so that a changing load on a
shared machine hits every variant alike; it prints the medians and their ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.image_side import normalize_pixels
from segllm_jax.models.hipie.mask_head import split_memory_levels
from segllm_jax.models.hipie.model import Hipie


def _stages(model: Hipie):
    cfg = model.cfg

    @nnx.jit
    def backbone(m, images_u8):
        return m.prepare_levels(m.encode_image(normalize_pixels(images_u8, m.cfg)))

    @nnx.jit
    def encoder(m, levels, prompts, image_index):
        enc = m.encode_prompt(levels, prompts, image_index)
        return enc.memory, enc.lang_fused

    @nnx.jit
    def decoder(m, memory, lang_fused):
        starts = tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in _SHAPES])[:-1])
        dec = m.decoder(memory, _SHAPES, starts, m.class_embed, m.bbox_embed)
        last = cfg.dec_layers - 1
        hs = dec.hs[last]
        return (m.class_embed[last](hs, lang_fused), dec.inter_references[last], m.iou_head[last](hs),
                m.controller(hs), dec.inter_references[last - 1][..., :2])

    @nnx.jit
    def mask_head(m, memory, controller_params, ref, sel_query, image_size_probe):
        from segllm_jax.models.hipie.mask_head import aligned_bilinear, binarize, dynamic_mask_logits, upsample_to_image

        feats = m.mask_head(split_memory_levels(memory, _SHAPES))
        idx = sel_query[:, None, None]
        ref_px = jnp.take_along_axis(ref, idx, axis=1) * image_size_probe.shape[0]
        params = jnp.take_along_axis(controller_params, idx, axis=1)
        lg = aligned_bilinear(dynamic_mask_logits(m.cfg, feats, ref_px, params)[:, 0], 2)
        size = image_size_probe.shape[0]
        return binarize(upsample_to_image(lg, (size, size)))

    return backbone, encoder, decoder, mask_head


_SHAPES: tuple[tuple[int, int], ...] = ()  # level sizes, set from --size before tracing


def _memory_bytes(jitted, *args) -> int | None:
    """Outputs + temporaries of the compiled stage (its arguments, i.e. the weights and the previous
    stage's outputs, are not counted: the weights alone are 217 MiB in float32)."""
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
        return int(ma.output_size_in_bytes + ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend / version reports it
        return None


def _time(fn, args, runs: int, warmup: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--config", choices=["segllm", "tiny"], default="segllm",
                    help="segllm: HIPIE-R50 as SegLLM runs it; tiny: toy widths (smoke runs)")
    ap.add_argument("--msda-impl", default="auto", help="pallas_kernels.ms_deform_attn impl (default: auto)")
    ap.add_argument("--compile-only", action="store_true", help="memory analysis only, no timing")
    ap.add_argument("--compare-unblocked", action="store_true",
                    help="encoder only: blocked vs unblocked fusion/FFN, runs interleaved")
    ap.add_argument("--unblocked-prompts", type=int, nargs="+",
                    help="with --compare-unblocked: prompt counts to run unblocked too (default: all)")
    ap.add_argument("--train", action="store_true",
                    help="memory of a training step's forward + backward of the HIPIE loss (compile only)")
    a = ap.parse_args()
    global _SHAPES
    s = a.size
    _SHAPES = tuple((-(-s // st), -(-s // st)) for st in (8, 16, 32, 64))
    dev = jax.devices()[0]
    print(f"backend={jax.default_backend()} device={dev.device_kind} jax={jax.__version__} size={s} "
          f"runs={a.runs} (median after {a.warmup} warm-up) config={a.config} msda_impl={a.msda_impl}")
    t0 = time.perf_counter()
    base = HipieConfig.tiny() if a.config == "tiny" else HipieConfig.hipie_r50_segllm()
    cfg = dataclasses.replace(base, msda_impl=a.msda_impl)
    model = Hipie(cfg, rngs=nnx.Rngs(0))
    print(f"model built in {time.perf_counter() - t0:.1f}s (random weights)")
    if a.train:
        for n in a.prompts:
            _train_memory(model, s, n)
        return
    backbone, encoder, decoder, mask_head = _stages(model)
    if a.compare_unblocked:
        _compare_unblocked(model, backbone, encoder, a)
        return
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.integers(0, 256, size=(1, s, s, 3), dtype=np.uint8))
    size_probe = jnp.zeros((s,), jnp.int8)  # carries the static image size through jit as a shape
    rows = []
    for n in a.prompts:
        prompts = jnp.asarray(rng.normal(size=(n, cfg.prompt_tokens, cfg.text_dim)).astype(np.float32))
        index = jnp.zeros((n,), jnp.int32)
        sel = jnp.full((n,), model.cfg.num_bg_queries, jnp.int32)
        if a.compile_only:
            stages = (backbone, encoder, decoder, mask_head)
            rows.append((n, None, _stage_memory(model, image, prompts, index, sel, size_probe, stages), None))
            _print_table(rows[-1:], header=len(rows) == 1)
            continue
        t_bb, levels = _time(backbone, (model, image), a.runs, a.warmup)
        t_enc, (memory, lang) = _time(encoder, (model, levels, prompts, index), a.runs, a.warmup)
        t_dec, (logits, boxes, iou, params, ref) = _time(decoder, (model, memory, lang), a.runs, a.warmup)
        t_mask, _ = _time(mask_head, (model, memory, params, ref, sel, size_probe), a.runs, a.warmup)
        mem = [_memory_bytes(backbone, model, image), _memory_bytes(encoder, model, levels, prompts, index),
               _memory_bytes(decoder, model, memory, lang),
               _memory_bytes(mask_head, model, memory, params, ref, sel, size_probe)]
        peak = None
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peak = stats["peak_bytes_in_use"]
        rows.append((n, [t_bb, t_enc, t_dec, t_mask], mem, peak))
        _print_table(rows[-1:], header=len(rows) == 1)  # print as we go: a later size may not fit in memory
    timed = [r for r in rows if r[1] is not None]
    if len(timed) >= 2:
        (n0, t0s, _, _), (n1, t1s, _, _) = timed[0], timed[-1]
        print(f"\n{n1} vs {n0} prompt(s): encoder {t1s[1] / t0s[1]:.2f}x, total {sum(t1s) / sum(t0s):.2f}x the time")


def _stage_memory(model, image, prompts, index, sel, size_probe, stages) -> list[int | None]:
    """Memory of every stage from abstract inputs: nothing is executed (``--compile-only``)."""
    backbone, encoder, decoder, mask_head = stages
    levels = jax.eval_shape(backbone, model, image)
    memory, lang = jax.eval_shape(encoder, model, levels, prompts, index)
    _, _, _, params, ref = jax.eval_shape(decoder, model, memory, lang)
    return [_memory_bytes(backbone, model, image), _memory_bytes(encoder, model, levels, prompts, index),
            _memory_bytes(decoder, model, memory, lang),
            _memory_bytes(mask_head, model, memory, params, ref, sel, size_probe)]


def _compare_unblocked(model: Hipie, backbone, encoder, a) -> None:
    """``--compare-unblocked``: the encoder stage for every prompt count, blocked (as configured) and
    unblocked, one run of each per round, so that a changing load hits every variant alike."""
    unblocked = nnx.clone(model)
    for _, module in nnx.iter_modules(unblocked):
        if hasattr(module, "block_bytes"):
            module.block_bytes = 2**62  # one block holds every token
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.integers(0, 256, size=(1, a.size, a.size, 3), dtype=np.uint8))
    levels = jax.block_until_ready(backbone(model, image))
    cases = {}
    for n in a.prompts:
        prompts = jnp.asarray(rng.normal(size=(n, model.cfg.prompt_tokens, model.cfg.text_dim)).astype(np.float32))
        compare = n in (a.unblocked_prompts or a.prompts)
        variants = [("blocked", model)] + ([("unblocked", unblocked)] if compare else [])
        for name, m in variants:
            cases[n, name] = (m, levels, prompts, jnp.zeros((n,), jnp.int32))
            for _ in range(a.warmup):
                jax.block_until_ready(encoder(*cases[n, name]))
    times = {case: [] for case in cases}
    for _ in range(a.runs):
        for case, args in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(encoder(*args))
            times[case].append(time.perf_counter() - t0)
    med = {case: statistics.median(t) for case, t in times.items()}
    print("\n| prompts | variant | encoder median (s) | runs (s) |\n|---|---|---|---|")
    for (n, name), t in times.items():
        print(f"| {n} | {name} | {med[n, name]:.3f} | {', '.join(f'{x:.2f}' for x in t)} |")
    for n in a.prompts:
        if (n, "unblocked") in med:
            print(f"{n} prompt(s): blocked / unblocked = {med[n, 'blocked'] / med[n, 'unblocked']:.2f}")
    n0, n1 = a.prompts[0], a.prompts[-1]
    if n1 != n0:
        print(f"blocked, {n1} vs {n0} prompt(s): {med[n1, 'blocked'] / med[n0, 'blocked']:.2f}x; per round: "
              + ", ".join(f"{x / y:.2f}" for x, y in zip(times[n1, 'blocked'], times[n0, 'blocked'], strict=True)))


def _train_memory(model: Hipie, size: int, n: int) -> None:
    """``--train``: compile ``value_and_grad`` of the HIPIE loss for ``n`` prompts on one image and print
    its temporaries and outputs (the compiled program's arguments, i.e. weights and batch, not counted)."""
    from segllm_jax.models.hipie.training import DNLabelEncoder
    from segllm_jax.train.hipie_loss import hipie_loss
    from segllm_jax.train.step import is_trainable

    models = {"hipie": model, "dn_resizer": DNLabelEncoder(model.cfg, rngs=nnx.Rngs(1))}

    def trains(path, _) -> bool:  # SegLLM's freezing rule; Hipie is SegLLM's 'segmentator'
        return path[0] != "hipie" or is_trainable("/".join(["segmentator", *map(str, path[1:])]))

    graphdef, trainable, rest = nnx.split(models, nnx.All(nnx.Param, trains), ...)

    def loss(trainable, prompts, images, target_masks, key):
        m = nnx.merge(graphdef, trainable, rest)
        levels = m["hipie"].image_features(images)
        return hipie_loss(m["hipie"], m["dn_resizer"], levels, prompts, jnp.zeros((n,), jnp.int32), target_masks,
                          target_masks, jnp.ones((n,), bool), key)

    sds = jax.ShapeDtypeStruct
    args = (trainable, sds((n, model.cfg.prompt_tokens, model.cfg.text_dim), jnp.float32),
            sds((1, size, size, 3), jnp.uint8), sds((n, size, size), jnp.uint8), jax.random.key(0))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    ma = step.lower(*args).compile().memory_analysis()
    weights = sum(v.get_value().size * v.get_value().dtype.itemsize for _, v in nnx.to_flat_state(trainable))
    print(f"| train, {n} prompt(s), {size} px | temporaries {ma.temp_size_in_bytes / 2**20:.0f} MiB | outputs "
          f"{ma.output_size_in_bytes / 2**20:.0f} MiB (gradients; trainable weights {weights / 2**20:.0f} MiB) |",
          flush=True)


def _print_table(rows, header: bool = True) -> None:
    names = ["backbone", "encoder", "decoder", "mask head"]
    if header:
        print()
        print("| prompts | stage | median time (s) | share | outputs + temporaries (MiB) |")
        print("|---|---|---|---|---|")
    for n, times, mem, peak in rows:
        times = times or [float("nan")] * len(names)  # --compile-only
        total = sum(times)
        for name, t, m in zip(names, times, mem, strict=True):
            ms = f"{m / 2**20:.0f}" if m is not None else "n/a"
            print(f"| {n} | {name} | {t:.4f} | {100 * t / total:.1f}% | {ms} |")
        print(f"| {n} | **total** | {total:.4f} | 100% | device peak: "
              f"{f'{peak / 2**20:.0f} MiB' if peak else 'n/a (backend does not report)'} |", flush=True)


if __name__ == "__main__":
    main()
