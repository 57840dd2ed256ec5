"""The learning recipe's first stage: the tiny CLIP tower taught to see MR-Shapes, patch by patch.

Why: the released SegLLM's CLIP is OpenAI's ViT-L/14, whose patch features already say what is where. The toy's
CLIP starts from random weights, and a tiny LLM trained from scratch on top of it learns to ignore its image
(``docs/learning_proof.md``). This stage gives the tower that provenance at toy size: linear heads on each patch
feature the LLM reads (``hidden_states[select_layer]``, CLS dropped) classify the patch's shape colour and kind
(or background) and the patch's own row and column, so the features carry appearance *and* place. The labels
come from the scenes' instance maps: a patch belongs to the instance covering most of it when that covers at
least :data:`segllm_jax.train.aids.COVER_MIN` of it, else to the background. With ``crop_weight`` > 0 the
tower also learns what the [REF] memory reads: the CLS feature of each shape's masked crop (the input of
``SegLLM.mask_encode``, cut as the training data cuts it) classifies the shape's colour and kind.

It is a ``segllm-jax train`` stage like the others (a config file exposing ``CONFIG = ClipPretrainConfig(...)``),
and writes ``WORKDIR/model``, a whole segllm checkpoint (the pretrained tower, every other part at its seed's
random init) that the next stage takes as ``init_checkpoint``. It takes a couple of minutes on a CPU, so it does
not checkpoint mid-way: an interrupted run starts again, a finished one is not run twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from segllm_jax import preprocess
from segllm_jax.config import SegLLMConfig
from segllm_jax.data import mrshapes
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.errors import ConfigError
from segllm_jax.models.layers import Linear
from segllm_jax.train.aids import COVER_MIN

log = logging.getLogger(__name__)

COLORS: tuple[str, ...] = tuple(mrshapes.PALETTE)
HEADS = ("color", "kind", "row", "col")  # what each patch feature is asked; label 0 of color / kind = background
CROP_HEADS = ("crop_color", "crop_kind")  # what the CLS feature of a shape's masked crop is asked (crop_weight > 0)


@dataclasses.dataclass(frozen=True)
class ClipPretrainConfig:
    """The CLIP stage: ``model`` is the whole SegLLM the next stages train (only its vision tower learns here);
    the scenes are ``data``'s ``train`` split (its ``val`` split measures the heads)."""

    model: SegLLMConfig
    data: MRShapesData
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03
    seed: int = 0
    # weight of the masked-crop objective (CLS of each shape's crop -> its colour and kind; batch_size crops a
    # step); 0 = patches only, the CLIP stage of the checkpoint that ships
    crop_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0 or not self.crop_weight >= 0:
            raise ConfigError("ClipPretrainConfig needs steps >= 1, batch_size >= 1, learning_rate > 0 and "
                              "crop_weight >= 0.")
        if self.batch_size > self.data.n_scenes:
            raise ConfigError(f"batch_size={self.batch_size} is more than the {self.data.n_scenes} training scenes.")

    def replace(self, **changes: Any) -> "ClipPretrainConfig":
        return dataclasses.replace(self, **changes)


def patch_labels(scene: mrshapes.Scene, grid: int) -> np.ndarray:
    """``[grid * grid, 4]`` int32 labels of the CLIP patches of ``scene`` (row-major, the tower's token order):
    colour and kind (0 = background, else 1 + the index in :data:`COLORS` / ``mrshapes.KINDS``), row, column."""
    p = grid * grid
    covers = np.stack([preprocess.clip_patch_cover(scene.mask(i), scene.image_hw, grid)
                       for i in range(len(scene.shapes))] or [np.zeros(p, np.float32)])  # [N, P]
    owner = covers.argmax(0)
    present = covers.max(0) >= COVER_MIN
    color = np.where(present, [1 + COLORS.index(scene.shapes[i].color) for i in owner], 0)
    kind = np.where(present, [1 + mrshapes.KINDS.index(scene.shapes[i].kind) for i in owner], 0)
    rows, cols = np.divmod(np.arange(p), grid)
    return np.stack([color, kind, rows, cols], axis=1).astype(np.int32)


class SceneArrays(NamedTuple):
    """What the stage trains on, for the first scenes of a split."""

    pixels: np.ndarray  # [n, S, S, 3] the scenes' CLIP pixels
    labels: np.ndarray  # [n, P, 4] their patch labels (:func:`patch_labels`)
    crops: np.ndarray  # [m, S, S, 3] CLIP pixels of every shape's masked crop (m = 0 when not asked for)
    crop_labels: np.ndarray  # [m, 2] the cropped shape's colour and kind (indices in COLORS / mrshapes.KINDS)


def shape_crop(scene: mrshapes.Scene, index: int, image_size: int) -> np.ndarray:
    """CLIP pixels of shape ``index``'s masked crop, cut as the training data cuts a [REF] crop: the image under
    the mask, cropped to the mask's extent at the scene's own resolution, pasted top-left in a zero square."""
    mask = scene.mask(index)
    x0, y0, x1, y1 = (int(v) for v in preprocess.mask_box(mask))
    return preprocess.clip_image(preprocess.masked_crop(np.asarray(scene.image), mask, (x0, y0, x1, y1)), image_size)


def scene_arrays(data: MRShapesData, split: str, n: int, image_size: int, grid: int, *,
                 crops: bool = False) -> SceneArrays:
    """The first ``n`` scenes of ``split`` (regenerated from the seed: exactly the scenes the prepared folder
    holds) as CLIP pixels and patch labels, and with ``crops`` the masked crops of their shapes."""
    pixels, labels, crop_pixels, crop_labels = [], [], [], []
    for i in range(n):
        scene, _ = mrshapes.scene_and_conversation(data.seed, split, i, data.max_rounds)
        pixels.append(preprocess.clip_image(scene.image, image_size))
        labels.append(patch_labels(scene, grid))
        for k, shape in enumerate(scene.shapes if crops else ()):
            if scene.mask(k).any():
                crop_pixels.append(shape_crop(scene, k, image_size))
                crop_labels.append((COLORS.index(shape.color), mrshapes.KINDS.index(shape.kind)))
    side = (image_size, image_size, 3)
    return SceneArrays(np.stack(pixels), np.stack(labels),
                       np.stack(crop_pixels) if crop_pixels else np.zeros((0, *side), np.float32),
                       np.asarray(crop_labels, np.int32).reshape(-1, 2))


class PatchProbe(nnx.Module):
    """The vision tower with one linear head per :data:`HEADS` entry on its patch features, and with ``crops``
    one per :data:`CROP_HEADS` entry on its CLS feature."""

    def __init__(self, tower: nnx.Module, grid: int, rngs: nnx.Rngs, *, crops: bool = False):
        d, axes = tower.cfg.hidden_size, ("vision_embed", None)
        self.tower = tower
        self.color = Linear(d, 1 + len(COLORS), axes=axes, rngs=rngs)
        self.kind = Linear(d, 1 + len(mrshapes.KINDS), axes=axes, rngs=rngs)
        self.row = Linear(d, grid, axes=axes, rngs=rngs)
        self.col = Linear(d, grid, axes=axes, rngs=rngs)
        self.crop_color = Linear(d, len(COLORS), axes=axes, rngs=rngs) if crops else None
        self.crop_kind = Linear(d, len(mrshapes.KINDS), axes=axes, rngs=rngs) if crops else None

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        feats = self.tower.patch_features(pixels)  # [B, P, D]
        return {name: getattr(self, name)(feats) for name in HEADS}  # each [B, P, classes]

    def crop_logits(self, crops: jax.Array) -> dict[str, jax.Array]:
        feats = self.tower.cls_feature(crops)  # [M, D]: what SegLLM.mask_encode projects
        return {name: getattr(self, name)(feats) for name in CROP_HEADS}  # each [M, classes]


def _loss(probe: PatchProbe, pixels: jax.Array, labels: jax.Array, crops: jax.Array | None,
          crop_labels: jax.Array | None, crop_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits = probe(pixels)
    terms = {name: optax.softmax_cross_entropy_with_integer_labels(logits[name], labels[..., k]).mean()
             for k, name in enumerate(HEADS)}
    loss = sum(terms.values())
    if crops is not None:
        crop_logits = probe.crop_logits(crops)
        crop_terms = {name: optax.softmax_cross_entropy_with_integer_labels(crop_logits[name],
                                                                              crop_labels[:, k]).mean()
                      for k, name in enumerate(CROP_HEADS)}
        loss = loss + crop_weight * sum(crop_terms.values())
        terms.update(crop_terms)
    return loss, terms


def accuracies(probe: PatchProbe, arrays: SceneArrays, batch: int = 64) -> dict[str, float]:
    """Per-head accuracy over held-out patches (colour and kind on shape patches, plus the background call) and,
    when the probe has crop heads, over held-out crops."""
    preds = []
    for s in range(0, len(arrays.pixels), batch):
        out = probe(jnp.asarray(arrays.pixels[s:s + batch]))
        preds.append(np.stack([np.asarray(out[name].argmax(-1)) for name in HEADS], axis=-1))
    pred, labels = np.concatenate(preds), arrays.labels  # [n, P, 4]
    shape = labels[..., 0] > 0
    result = {"color": float((pred[..., 0] == labels[..., 0])[shape].mean()),
              "kind": float((pred[..., 1] == labels[..., 1])[shape].mean()),
              "background": float(((pred[..., 0] == 0) == ~shape).mean()),
              "row": float((pred[..., 2] == labels[..., 2]).mean()),
              "col": float((pred[..., 3] == labels[..., 3]).mean())}
    if probe.crop_color is not None and len(arrays.crops):
        crop_preds = []
        for s in range(0, len(arrays.crops), batch):
            out = probe.crop_logits(jnp.asarray(arrays.crops[s:s + batch]))
            crop_preds.append(np.stack([np.asarray(out[name].argmax(-1)) for name in CROP_HEADS], axis=-1))
        hits = np.concatenate(crop_preds) == arrays.crop_labels  # [m, 2]
        result.update({name: float(hits[:, k].mean()) for k, name in enumerate(CROP_HEADS)})
    return result


class _Batches:
    """Indices of ``batch`` items a step, in a permutation of ``n`` drawn anew each epoch."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator):
        self.n, self.batch, self.rng = n, batch, rng
        self.order, self.at = rng.permutation(n), 0

    def next(self) -> np.ndarray:
        if self.at + self.batch > len(self.order):  # a new epoch, reshuffled
            self.order, self.at = self.rng.permutation(self.n), 0
        self.at += self.batch
        return self.order[self.at - self.batch:self.at]


def train(config: ClipPretrainConfig, workdir: str | Path) -> list[dict[str, Any]]:
    """Runs the stage unless ``WORKDIR/model`` exists; returns this invocation's metric records."""
    from segllm_jax.checkpoint import build_model, flat_arrays, save
    from segllm_jax.tokenizer import SegTokenizer

    cfg, workdir = config, Path(workdir)
    if (workdir / "model" / "config.json").exists():
        return []
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train_config.txt").write_text(repr(cfg) + "\n")
    cfg.data.prepare()
    tokenizer = SegTokenizer.from_pretrained(cfg.data.tokenizer_dir)
    tokenizer.check_vocab_size(cfg.model.llm.vocab_size)
    vision = cfg.model.vision
    grid = vision.image_size // vision.patch_size
    t0 = time.perf_counter()
    with_crops = cfg.crop_weight > 0
    train_set = scene_arrays(cfg.data, "train", cfg.data.n_scenes, vision.image_size, grid, crops=with_crops)
    val = scene_arrays(cfg.data, "val", cfg.data.eval_scenes, vision.image_size, grid, crops=with_crops) \
        if cfg.data.eval_scenes else None
    log.info("CLIP stage: %d training scenes (%d patches each) and %d shape crops in %.0f s", len(train_set.pixels),
             grid * grid, len(train_set.crops), time.perf_counter() - t0)

    model = build_model("segllm", cfg.model, seed=cfg.seed)
    probe = PatchProbe(model.vision_tower, grid, nnx.Rngs(cfg.seed + 1), crops=with_crops)
    warmup = int(np.ceil(cfg.steps * cfg.warmup_ratio))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1), 0.0)
    optimizer = nnx.Optimizer(probe, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(probe: PatchProbe, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array, crops: jax.Array | None,
             crop_labels: jax.Array | None) -> dict[str, jax.Array]:
        (loss, terms), grads = nnx.value_and_grad(_loss, has_aux=True)(probe, x, y, crops, crop_labels,
                                                                       cfg.crop_weight)
        optimizer.update(probe, grads)
        return {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}

    from tqdm import tqdm

    scenes = _Batches(len(train_set.pixels), cfg.batch_size, np.random.default_rng(cfg.seed))
    crops = _Batches(len(train_set.crops), cfg.batch_size, np.random.default_rng(cfg.seed + 2)) if with_crops \
        else None
    records = []
    metrics_path = workdir / "metrics.jsonl"
    with metrics_path.open("w") as log_file, tqdm(total=cfg.steps, unit="step", dynamic_ncols=True) as bar:
        for s in range(cfg.steps):
            idx = scenes.next()
            c = crops.next() if crops is not None else None
            t = time.perf_counter()
            out = step(probe, optimizer, jnp.asarray(train_set.pixels[idx]), jnp.asarray(train_set.labels[idx]),
                       None if c is None else jnp.asarray(train_set.crops[c]),
                       None if c is None else jnp.asarray(train_set.crop_labels[c]))
            metrics = {k: float(v) for k, v in out.items()}
            record = {"step": s, **metrics, "lr": float(schedule(s)), "step_time_s": time.perf_counter() - t}
            log_file.write(json.dumps(record) + "\n")
            records.append(record)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            bar.update(1)
    summary = {"steps": cfg.steps, "final_loss": records[-1]["loss"]}
    if val is not None:
        summary["val_accuracy"] = accuracies(probe, val)
        log.info("CLIP stage, held-out accuracy: %s", summary["val_accuracy"])
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    tmp = workdir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp, "segllm", cfg.model, flat_arrays(model))  # the tower trained in place (probe.tower is model's)
    tokenizer.save(tmp)
    tmp.rename(workdir / "model")
    return records
