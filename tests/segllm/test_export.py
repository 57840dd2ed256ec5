"""``segllm-jax export``: convert -> export -> convert is bitwise, the parts load where they should, and an
export never leaves a partial folder or touches an existing one.

The tiny release fixture (``tiny_release.py``) and the golden recipe folder are PyTorch-layout checkpoints
written independently of export; every comparison is against them or against the converted parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segllm_jax.apps import cli
from segllm_jax.checkpoint import PARAMS, TRAINING_PARAMS
from segllm_jax_convert.convert import convert_checkpoint
from segllm_jax_convert.export import export_checkpoint, read_item
from segllm_jax_convert.io import open_checkpoint

from .conftest import golden_segllm_dir, write_release_folder


def assert_same_items(a: Path, b: Path, item: str = PARAMS) -> int:
    """Every array of ``a/item`` equals ``b/item`` bit for bit (same paths, dtypes, shapes); returns the count."""
    left, right = read_item(a, item), read_item(b, item)
    assert sorted(left) == sorted(right)
    for path in left:
        assert left[path].dtype == right[path].dtype and left[path].shape == right[path].shape, path
        assert left[path].tobytes() == right[path].tobytes(), f"{path} differs"
    return len(left)


def release_tensors(folder: Path, prefix: str = "") -> dict[str, np.ndarray]:
    source = open_checkpoint(folder)
    return {k[len(prefix):]: source.load(k) for k in source if k.startswith(prefix)}


def test_tiny_convert_export_convert_is_bitwise(tiny, tmp_path):
    root, _ = tiny
    out = export_checkpoint(root / "converted", tmp_path / "exported", max_shard_bytes=200_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["segmentator"] == "hipie"
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    # every tensor the fixture wrote is back, bit for bit, under its release name
    release, exported = release_tensors(root / "release"), release_tensors(out)
    assert set(exported) == set(release)
    for key, value in release.items():
        assert exported[key].dtype == value.dtype and exported[key].tobytes() == value.tobytes(), key
    again = convert_checkpoint(out, tmp_path / "again", progress=False)
    count = assert_same_items(root / "converted", again)
    print(f"\nconvert -> export -> convert: {count} parameters bitwise identical, {len(shards)} shards")


def test_bfloat16_export(tiny, tmp_path):
    root, _ = tiny
    out = export_checkpoint(root / "converted", tmp_path / "bf16", dtype="bfloat16")
    exported, release = release_tensors(out), release_tensors(root / "release")
    assert {str(v.dtype) for v in exported.values()} == {"bfloat16"}
    for key, value in release.items():
        assert exported[key].tobytes() == value.astype(exported[key].dtype).tobytes(), key
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_llm_part_loads_in_transformers_and_matches_our_logits(tiny, tmp_path):
    import jax.numpy as jnp
    import torch
    from transformers import LlamaForCausalLM

    root, loaded = tiny
    out = export_checkpoint(root / "converted", tmp_path / "llm", part="llm", dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, loaded.config.llm.vocab_size, (2, 13))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy().astype(np.float64)
    llm = loaded.model.llm
    ours = np.asarray(llm(llm.embed(jnp.asarray(ids))).logits, np.float64)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"\nexported LLM in transformers vs ours, float32: logits max-abs {np.abs(ours - ref).max():.2e}, "
          f"rel {rel:.2e}")
    assert rel <= 1e-5


def test_clip_and_hipie_parts_are_the_release_sub_state_dicts(tiny, tmp_path):
    import torch

    root, _ = tiny
    clip = export_checkpoint(root / "converted", tmp_path / "clip", part="clip")
    assert json.loads((clip / "config.json").read_text())["model_type"] == "clip_vision_model"
    exported = release_tensors(clip)
    release = release_tensors(root / "release", "model.vision_tower.vision_tower.")
    assert exported.keys() == release.keys()
    assert all(exported[k].tobytes() == release[k].tobytes() for k in release)

    hipie = export_checkpoint(root / "converted", tmp_path / "hipie", part="hipie")
    state = torch.load(hipie / "r50_parts.pth", weights_only=True)  # plain tensors only
    release = release_tensors(root / "release", "model.segmentator.hipie.")
    assert state.keys() == release.keys()
    assert all(np.array_equal(state[k].numpy(), release[k]) for k in release)


def test_interrupted_export_leaves_no_folder(tiny, tmp_path, monkeypatch):
    import safetensors.numpy

    root, _ = tiny
    real, calls = safetensors.numpy.save_file, []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(root / "converted", tmp_path / "out", max_shard_bytes=200_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its hidden temporary sibling


@pytest.mark.parametrize("existing", ["folder", "empty folder", "file"])
def test_existing_out_is_refused(tiny, tmp_path, capsys, existing):
    root, _ = tiny
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        if existing == "folder":
            (out / "mine.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["export", str(root / "converted"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segllm-jax export: the output folder") and "exists" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_refuses_a_folder_that_is_not_a_segllm_checkpoint(tiny, tmp_path, capsys):
    root, _ = tiny
    assert cli.main(["export", str(root / "release"), str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_export_writes_the_readme_of_absent_keys(tiny, tmp_path, capsys):
    root, _ = tiny
    assert cli.main(["export", str(root / "converted"), str(tmp_path / "out"), "--part", "llm"]) == 0
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## Absent keys" in readme and "rotary_emb" in readme


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    if not (golden_segllm_dir() / "make_segllm_state_dict.py").exists():
        pytest.skip("needs the golden recipe folder ../shared/golden/segllm")
    root = tmp_path_factory.mktemp("golden_export")
    release = write_release_folder(root / "release", seed=0)
    converted = convert_checkpoint(release, root / "converted", progress=False,
                                   vision_config=golden_segllm_dir() / "clip_vision_config.json")
    return release, converted


def test_golden_convert_export_convert_is_bitwise(golden, tmp_path):
    release, converted = golden
    assert (converted / TRAINING_PARAMS).is_dir()  # the recipe has HIPIE's DN label encoder
    out = export_checkpoint(converted, tmp_path / "exported")
    again = convert_checkpoint(out, tmp_path / "again", progress=False)
    n = assert_same_items(converted, again)
    m = assert_same_items(converted, again, TRAINING_PARAMS)
    print(f"\ngolden convert -> export -> convert: {n} parameters + {m} training parameters bitwise identical")


def test_golden_export_like_reproduces_the_recipe_state_dict(golden, tmp_path):
    release, converted = golden
    keys = json.loads((golden_segllm_dir() / "state_dict_keys.json").read_text())["keys"]
    recipe = release_tensors(release)
    plain = release_tensors(export_checkpoint(converted, tmp_path / "plain"))
    assert set(plain) <= set(recipe)
    for key, value in plain.items():  # every key the converter maps (and the DN label encoder)
        assert value.dtype == recipe[key].dtype and value.tobytes() == recipe[key].tobytes(), key
    full = release_tensors(export_checkpoint(converted, tmp_path / "full", like=release))
    assert set(full) == {k["key"] for k in keys}
    for k in keys:
        assert list(full[k["key"]].shape) == k["shape"] and full[k["key"]].tobytes() == recipe[k["key"]].tobytes()
    print(f"\ngolden export: {len(plain)} keys from the tables, {len(full) - len(plain)} restored with --like; "
          f"all {len(full)} bitwise equal to the recipe")
