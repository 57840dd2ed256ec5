"""Fixtures for the assembled SegLLM: the golden release folder, converted with the real converter."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[2]


def golden_segllm_dir() -> Path:
    return Path(os.environ.get("SEGLLM_GOLDEN_SEGLLM", REPO.parent / "shared" / "golden" / "segllm"))


def golden_files() -> list[Path]:
    folder = golden_segllm_dir()
    return sorted(folder.glob("seed*.npz")) if folder.is_dir() else []


def _recipe(folder: Path):
    spec = importlib.util.spec_from_file_location("segllm_recipe", folder / "make_segllm_state_dict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_release_folder(dst: Path, seed: int) -> Path:
    """A release-layout SegLLM folder: the golden checkpoint files + the recipe weights as safetensors."""
    folder = golden_segllm_dir()
    keys = json.loads((folder / "state_dict_keys.json").read_text())["keys"]
    state = _recipe(folder).make_segllm_state_dict(keys, seed)
    shutil.copytree(folder / "checkpoint_files", dst)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="session")
def golden_segllm_checkpoints(tmp_path_factory):
    """seed -> converted segllm-jax checkpoint folder (built once per seed and session)."""
    from segllm_jax_convert.convert import convert_checkpoint

    cache: dict[int, Path] = {}

    def get(seed: int) -> Path:
        if seed not in cache:
            root = tmp_path_factory.mktemp(f"segllm_seed{seed}")
            release = write_release_folder(root / "release", seed)
            cache[seed] = convert_checkpoint(release, root / "converted", progress=False,
                                             vision_config=golden_segllm_dir() / "clip_vision_config.json")
        return cache[seed]

    return get


def build_tiny(tmp_path_factory):
    """(root, loaded): a tiny release folder converted and loaded, plus ``root/scene.png`` (80x48).

    Used by the session fixture ``tiny`` of ``tests/conftest.py`` (shared by every test folder)."""
    from PIL import Image

    import segllm_jax
    from segllm_jax_convert.convert import convert_checkpoint

    from .tiny_release import write_tiny_release

    if not (golden_segllm_dir() / "state_dict_keys.json").exists():
        pytest.skip("the release key list comes from ../shared/golden/segllm")
    root = tmp_path_factory.mktemp("tiny_segllm")
    release = write_tiny_release(root / "release")
    assert (release / "model.safetensors.index.json").exists() and (release / "tokenizer.json").exists()
    convert_checkpoint(release, root / "converted", progress=False)
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    image[10:30, 10:30] = (255, 0, 0)
    Image.fromarray(image).save(root / "scene.png")
    return root, segllm_jax.load(root / "converted")
