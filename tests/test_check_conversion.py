"""`segllm-jax check-conversion` passes a right conversion and fails a wrong one."""

import pytest
from hf_fixtures import save_hf, tiny_clip_vision_hf, tiny_llama_hf

from segllm_jax import checkpoint
from segllm_jax.apps.cli import main
from segllm_jax_convert.convert import convert_checkpoint


@pytest.mark.parametrize("make", [tiny_llama_hf, tiny_clip_vision_hf], ids=["llama", "clip_vision"])
def test_right_conversion_passes(tmp_path, capsys, make):
    save_hf(make(), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--quiet"]) == 0
    assert main(["check-conversion", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "layers.0" in out
    print(out)


def test_wrong_conversion_fails(tmp_path, capsys):
    """A converted checkpoint whose one layer was perturbed must fail and point at that layer."""
    save_hf(tiny_llama_hf(), tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    kind, cfg, model = checkpoint.load_model(tmp_path / "dst")
    arrays = checkpoint.flat_arrays(model)
    arrays["layers/1/mlp/up_proj/kernel"] = arrays["layers/1/mlp/up_proj/kernel"] * 1.01
    checkpoint.save(tmp_path / "bad", kind, cfg, arrays)
    assert main(["check-conversion", str(tmp_path / "src"), str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
            if line.startswith("| layers.")}
    assert rows["layers.0"] < 1e-5 < rows["layers.1+norm"] and "FAIL" in out


def test_bfloat16_conversion_is_gated_by_kl(tmp_path, capsys):
    save_hf(tiny_llama_hf(), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16", "--quiet"]) == 0
    kind, cfg, _ = checkpoint.load_model(tmp_path / "dst")
    assert cfg.param_dtype == "bfloat16"
    assert main(["check-conversion", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert "mean KL <= 0.015" in capsys.readouterr().out
