"""COCO run-length encoding of masks and the JSON register every generator writes (architecture.md §E1).

Why a module of its own: the MR-Shapes and COCO conversation generators both write an annotation
register (``{mask_id: RLE}``, read back by :class:`segllm_jax.data.registers.JsonMaskRegister`), and the
register reader decodes the same format; one encoder/decoder pair serves all three.

Two encodings, both COCO's (column-major runs starting with a, maybe empty, run of zeros):

* uncompressed (``counts`` a list of ints): exact, readable, and decoded here with NumPy; MR-Shapes'
  small masks use it;
* compressed (``counts`` pycocotools' LEB128-like string): several times smaller, what real photos'
  registers use (a whole register is held in memory by every input worker).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from segllm_jax.errors import InputError


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a 2-D mask: column-major runs, starting with a (maybe empty) 0-run."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise InputError(f"an RLE mask must be 2-D, got shape {mask.shape}.")
    flat = mask.ravel(order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    if flat[0]:
        runs = np.concatenate([[0], runs])
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in runs]}


def rle_encode_compressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE (``counts`` an ASCII string, as pycocotools writes it) of a 2-D mask."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise InputError(f"an RLE mask must be 2-D, got shape {mask.shape}.")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))  # [H, W] uint8, column-major
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Boolean [H, W] mask from COCO uncompressed RLE (compressed string counts are not supported)."""
    height, width = (int(v) for v in rle["size"])
    if isinstance(rle["counts"], (str, bytes)):
        raise InputError("compressed RLE (string counts) is not supported; store uncompressed counts lists.")
    counts = np.asarray(rle["counts"], np.int64)
    if np.any(counts < 0) or counts.sum() != height * width:
        raise InputError(f"RLE counts sum to {counts.sum()} but size is {height}x{width}; "
                         "the register is corrupt.")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")


def register_text(register: Mapping[str, Mapping[str, Any]]) -> str:
    """A register ``{mask_id: RLE}`` as the compact one-line JSON the generators write."""
    return json.dumps(register, separators=(",", ":")) + "\n"
