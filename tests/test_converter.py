"""Converter strictness: every kind of bad checkpoint gets its specific message and writes nothing."""

import json
import pickle

import numpy as np
import pytest
import torch
from hf_fixtures import save_hf, tiny_llama_hf
from safetensors.torch import save_file

from segllm_jax import checkpoint
from segllm_jax.apps.cli import main
from segllm_jax.errors import CheckpointError, ConversionError
from segllm_jax_convert.convert import convert_checkpoint
from segllm_jax_convert.io import open_checkpoint


@pytest.fixture(scope="module")
def hf_llama():
    return tiny_llama_hf()


def write_variant(root, hf, edit):
    """Saves the tiny LLaMA as one safetensors file after ``edit(state_dict)``."""
    save_hf(hf, root)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    edit(sd)
    (root / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "model.safetensors")
    return root


def assert_refused(src, dst, *fragments):
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(src, dst, progress=False)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert not dst.exists() or not any(dst.iterdir()), "a refused conversion must write nothing"
    return str(e.value)


def test_missing_key_is_named(tmp_path, hf_llama):
    src = write_variant(tmp_path / "src", hf_llama, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    msg = assert_refused(src, tmp_path / "dst", "model parameters that no checkpoint key fills",
                         "layers/1/mlp/up_proj/kernel")
    assert isinstance(ConversionError(msg), CheckpointError)


def test_extra_key_is_named(tmp_path, hf_llama):
    src = write_variant(tmp_path / "src", hf_llama,
                        lambda sd: sd.update({"model.layers.0.self_attn.q_bias": torch.zeros(64)}))
    assert_refused(src, tmp_path / "dst", "no rule maps", "model.layers.0.self_attn.q_bias")


def test_wrong_shape_is_named(tmp_path, hf_llama):
    def edit(sd):
        sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 150)
        sd["model.norm.weight"] = torch.zeros(63)
    src = write_variant(tmp_path / "src", hf_llama, edit)
    assert_refused(src, tmp_path / "dst", "shape/dtype mismatches (2)", "model.layers.0.mlp.down_proj.weight",
                   "needs (160, 64)", "model.norm.weight")


def test_wrong_dtype_is_named(tmp_path, hf_llama):
    src = write_variant(tmp_path / "src", hf_llama,
                        lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    assert_refused(src, tmp_path / "dst", "dtype int32 cannot fill norm/scale")


def test_truncated_safetensors(tmp_path, hf_llama):
    src = save_hf(hf_llama, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(src, tmp_path / "dst", "is truncated")


def test_truncated_pth(tmp_path, hf_llama):
    torch.save(hf_llama.state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "bad.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        open_checkpoint(tmp_path / "bad.pth")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"weight": _RunsCode()}, f)
    torch.save({"w": torch.zeros(2), "payload": _RunsCode()}, tmp_path / "evil2.pth")
    for name in ("evil.bin", "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused"):
            open_checkpoint(tmp_path / name)
    assert "this checkpoint ran code" not in capsys.readouterr().out


def test_bin_and_pth_formats_convert_like_safetensors(tmp_path, hf_llama):
    save_hf(hf_llama, tmp_path / "st")
    hf_llama.save_pretrained(tmp_path / "bin", safe_serialization=False)
    bin_files = list((tmp_path / "bin").glob("*.bin"))
    if not bin_files:  # transformers 5 always writes safetensors: write the .bin layout by hand
        torch.save(hf_llama.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
        for f in (tmp_path / "bin").glob("*.safetensors"):
            f.unlink()
    a, b = open_checkpoint(tmp_path / "st"), open_checkpoint(tmp_path / "bin")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a.load(k), b.load(k))


def test_cli_prints_one_sentence_and_exit_code(tmp_path, hf_llama, capsys):
    src = write_variant(tmp_path / "src", hf_llama, lambda sd: sd.pop("lm_head.weight"))
    capsys.readouterr()  # drop save_pretrained's progress output
    assert main(["convert", str(src), str(tmp_path / "dst"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segllm-jax convert: checkpoint does not match") and "Traceback" not in err
    assert "lm_head/kernel" in err


def test_restore_names_mismatched_params(tmp_path, hf_llama):
    """Our own checkpoint folder is loaded strictly too."""
    save_hf(hf_llama, tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    meta = json.loads((tmp_path / "dst" / "config.json").read_text())
    meta["config"]["intermediate_size"] = 128
    (tmp_path / "dst" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"mis-shaped .*layers/0/mlp/down_proj/kernel: stored \(160, 64\)"):
        checkpoint.load_model(tmp_path / "dst")


def test_sharded_index_with_missing_shard(tmp_path, hf_llama):
    src = save_hf(hf_llama, tmp_path / "src", shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (src / victim).unlink()
    assert_refused(src, tmp_path / "dst", "names shards that are missing", victim)
