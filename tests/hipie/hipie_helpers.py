"""Helpers shared by the decoder-side HIPIE tests: a converted ``Hipie`` per recipe checkpoint, jitted steps."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.models.hipie.model import Hipie


def convert_into(model: Hipie, pth: Path | str) -> Hipie:
    """The real converter path: open the .pth, pick the table from its keys, convert, load."""
    from segllm_jax_convert.engine import convert, flat_targets, load_arrays
    from segllm_jax_convert.hipie import hipie_table_for
    from segllm_jax_convert.io import open_checkpoint

    source = open_checkpoint(pth)
    arrays = convert(source, hipie_table_for(list(source), model.cfg.num_queries), flat_targets(model),
                     progress=False)
    return load_arrays(model, arrays)


@functools.lru_cache(maxsize=2)
def converted_hipie(pth: str) -> Hipie:
    """A full-size ``Hipie`` with the weights of ``pth`` (cached: building + converting takes seconds)."""
    model = Hipie(HipieConfig.hipie_r50_segllm(), rngs=nnx.Rngs(0))
    return convert_into(model, pth)


@nnx.jit(static_argnames=("spatial_shapes", "image_size"))
def decode_jit(model: Hipie, memory, lang_fused, spatial_shapes, image_size, topk_indices=None):
    return model.decode(memory, lang_fused, spatial_shapes, image_size, topk_indices=topk_indices)


@nnx.jit
def all_pred_masks_jit(model: Hipie, outputs):
    return model.all_pred_masks(outputs)


def topk_mismatch_is_near_tie(got: np.ndarray, want: np.ndarray, scores: np.ndarray, tol: float) -> bool:
    """True when ``got`` and ``want`` hold the same token set and differ only at ranks whose golden
    scores are within ``tol`` of each other (the README's near-tie caveat)."""
    if set(got.tolist()) != set(want.tolist()):
        return False
    bad = np.nonzero(got != want)[0]
    if bad.size == 0:
        return True
    s = scores[want[bad]]
    return float(s.max() - s.min()) <= tol


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@nnx.jit
def image_stages_jit(model: Hipie, images_u8):
    """(backbone features, level inputs) of uint8 images: the per-image half, with its intermediates."""
    from segllm_jax.models.hipie.image_side import normalize_pixels

    feats = model.encode_image(normalize_pixels(images_u8, model.cfg))
    return feats, model.prepare_levels(feats)


@nnx.jit
def segment_debug_jit(model: Hipie, levels, prompts, image_index, topk_indices=None):
    """``Hipie.segment`` keeping the encoder intermediates (every layer's memory)."""
    return model.segment(levels, prompts, image_index, topk_indices=topk_indices, return_intermediates=True)
