"""Where the training golden files are, and the (file, variant) parameters of the tests that read them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("det", "rand")


def golden_dir() -> Path:
    return Path(os.environ.get("SEGLLM_GOLDEN_HIPIE", REPO_ROOT.parent / "shared" / "golden" / "hipie"))


def golden_params() -> list:
    """One parameter per ``train_seed*_256.npz`` x variant; a skip with the reason when there are none."""
    folder = golden_dir()
    files = sorted(folder.glob("train_seed*_256.npz")) if folder.is_dir() else []
    if not files:
        return [pytest.param(None, v, marks=pytest.mark.skip(reason=f"no train_seed*_256.npz in {folder} "
                                                                    "(set SEGLLM_GOLDEN_HIPIE)"))
                for v in VARIANTS]
    return [pytest.param(f, v, id=f"{f.stem}-{v}") for f in files for v in VARIANTS]


def pad_rows(flat: np.ndarray, counts, k: int) -> np.ndarray:
    """Golden rows concatenated over prompts [N, ...] -> padded [B, K, ...] (zeros in padding rows)."""
    out = np.zeros((len(counts), k) + flat.shape[1:], flat.dtype)
    o = 0
    for b, c in enumerate(counts):
        out[b, :c] = flat[o:o + c]
        o += c
    return out
