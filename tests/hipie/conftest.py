"""Shared fixtures of the HIPIE tests: the golden folder, its files, recipe weights as a .pth.

The golden folder comes from ``SEGLLM_GOLDEN_HIPIE`` (default ``<repo>/../shared/golden/hipie``,
resolved from this file, not from the working directory). Tests iterate over every
``seed*_256.npz`` found and read the seed from the file: held-back acceptance sets use other
seeds and images with the same layout.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGE_STD = np.array([58.395, 57.12, 57.375], np.float32)


def golden_dir() -> Path:
    return Path(os.environ.get("SEGLLM_GOLDEN_HIPIE", REPO_ROOT.parent / "shared" / "golden" / "hipie"))


def golden_files(pattern: str = "seed*_256.npz") -> list[Path]:
    folder = golden_dir()
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def _golden_params(pattern: str) -> list:
    files = golden_files(pattern)
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {pattern} in {golden_dir()} "
                                                              "(set SEGLLM_GOLDEN_HIPIE)"))]
    return [pytest.param(f, id=f.stem) for f in files]


GOLDEN_256 = _golden_params("seed*_256.npz")


def load_recipe_module(folder: Path | None = None):
    """``make_state_dict.py`` of the golden folder, imported by path (it is not a package)."""
    path = (folder or golden_dir()) / "make_state_dict.py"
    spec = importlib.util.spec_from_file_location("hipie_golden_make_state_dict", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(name: str, got, want, *, rtol: float = 1e-4, atol_rel: float = 1e-4) -> None:
    """README tolerance ``allclose(rtol, atol=atol_rel*absmax(golden))``; prints max-abs / max-rel first."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != golden {want.shape}"
    absmax = float(np.abs(want).max())
    err = np.abs(got - want)
    max_abs = float(err.max())
    max_rel = max_abs / absmax if absmax else max_abs
    print(f"  {name:<22s} shape={str(want.shape):<20s} max|d|={max_abs:.3e}  max|d|/absmax={max_rel:.3e}  "
          f"absmax={absmax:.3e}")
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_rel * absmax, err_msg=name)


@pytest.fixture(scope="session")
def golden_folder() -> Path:
    return golden_dir()


@pytest.fixture(scope="session")
def recipe_pth(tmp_path_factory) -> Callable[[int], Path]:
    """``recipe_pth(seed)`` -> path of a torch.save'd {key: tensor} dict with every key of
    ``state_dict_keys.json`` (BERT and MaskDINO included), made by the golden recipe.
    Cached per seed for the whole session: the recipe draws ~170 M numbers."""
    torch = pytest.importorskip("torch")
    cache: dict[int, Path] = {}

    def make(seed: int) -> Path:
        seed = int(seed)
        if seed not in cache:
            recipe = load_recipe_module()
            keys = recipe.load_keys_json(golden_dir() / "state_dict_keys.json")
            sd = recipe.make_state_dict(keys, seed)
            path = tmp_path_factory.mktemp(f"hipie_recipe_seed{seed}") / "hipie.pth"
            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
            cache[seed] = path
        return cache[seed]

    return make


def convert_subtree(pth, module, subtree: str) -> None:
    """Converts the recipe checkpoint into ``module`` (one child of ``Hipie``, built on its own)
    through the real engine and table: keys routed outside ``subtree`` count as consumed."""
    from segllm_jax_convert.engine import convert, flat_targets, load_arrays
    from segllm_jax_convert.hipie import HIPIE_TABLE
    from segllm_jax_convert.io import open_checkpoint

    arrays = convert(open_checkpoint(pth), HIPIE_TABLE, flat_targets(module), subtree=subtree, progress=False)
    load_arrays(module, arrays)


def normalized_image_nhwc(data) -> np.ndarray:
    """``input_image_u8`` (3, S, S) uint8 -> (1, S, S, 3) float32, (x - mean) / std (architecture.md §D5)."""
    x = data["input_image_u8"].astype(np.float32).transpose(1, 2, 0)[None]
    return (x - IMAGE_MEAN) / IMAGE_STD


def build_random(factory, seed: int = 0):
    """``factory()`` built abstractly (``nnx.eval_shape``: no per-shape RNG compilations, which cost
    ~0.5 s each on CPU) and filled with NumPy random weights: kernels N(0, 1/fan_in), norm scales
    and FrozenBN weight/var U(0.5, 1.5), embeddings N(0, 0.5), everything else N(0, 0.1)."""
    import jax.numpy as jnp
    from flax import nnx

    module = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    for path, var in flat:
        abstract = var.get_value()  # a ShapeDtypeStruct
        shape, name = tuple(abstract.shape), str(path[-1])
        if name == "kernel":
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name in ("scale", "weight", "running_var") or name.startswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "embedding":
            value = rng.normal(0, 0.5, shape)
        else:
            value = rng.normal(0, 0.1, shape)
        var.set_value(jnp.asarray(value, abstract.dtype))
    nnx.update(module, nnx.from_flat_state(flat))
    return module


def build_abstract(factory):
    """``factory()`` without materialised weights; fill it with :func:`convert_subtree`."""
    from flax import nnx

    return nnx.eval_shape(factory)
