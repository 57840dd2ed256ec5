"""Weight-only quantized inference through qwix (``segllm_jax.load(DIR, quantize=...)``, docs/memory.md)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import segllm_jax
from segllm_jax.errors import ConfigError
from segllm_jax.models.layers import Linear
from segllm_jax.session import MultiRoundSession

from .conftest import REPO, golden_segllm_dir

SCRIPT = ["Segment the red square.", "Segment the region left of [REF:1].", "Segment the background."]


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_quantized_tiny_checkpoint_runs_a_three_round_session(tiny, qtype):
    root, float_loaded = tiny
    loaded = segllm_jax.load(root / "converted", quantize=qtype, quantize_vision=qtype == "int4")
    llm = loaded.model.llm
    assert loaded.config.llm.dtype == "bfloat16"
    q_proj = llm.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear) and hasattr(type(q_proj), "_unquantized_type")  # qwix's copy
    assert not isinstance(q_proj.kernel, type(float_loaded.model.llm.layers[0].self_attn.q_proj.kernel))
    tower_quantized = hasattr(type(loaded.model.vision_tower.layers[0].fc1), "_unquantized_type")
    assert tower_quantized == (qtype == "int4")
    session = MultiRoundSession(loaded, root / "scene.png")
    results = [session.ask(text) for text in SCRIPT]
    assert [r.refs for r in results] == [(), (1,), ()]
    for r in results:
        assert r.mask.shape == (48, 80) and np.isfinite(r.prompt).all()


@pytest.mark.parametrize("bad", ["int3", "fp8", "float16", "uint8", "", 8])
def test_unsupported_qtype_is_one_clear_error_before_loading(bad, tmp_path):
    with pytest.raises(ConfigError, match="use one of int8, int4") as info:
        segllm_jax.load(tmp_path / "no_such_checkpoint", quantize=bad)
    if bad in ("float16", "uint8"):
        assert "dtype that weight-only quantization through qwix does not support" in str(info.value)


def test_quantize_vision_alone_and_unquantizable_kinds_are_refused(tmp_path):
    from segllm_jax.quantize import quantized_config

    with pytest.raises(ConfigError, match="quantize_vision needs"):
        segllm_jax.load(tmp_path, quantize_vision=True)
    with pytest.raises(ConfigError, match="not 'hipie'"):
        quantized_config("hipie", object())


def test_cli_refuses_an_unknown_quantize_value(tmp_path, capsys):
    from segllm_jax.apps.cli import main

    with pytest.raises(SystemExit) as info:
        main(["chat", "--checkpoint", str(tmp_path), "--quantize", "int2"])
    assert info.value.code == 2 and "invalid choice: 'int2'" in capsys.readouterr().err


@pytest.mark.golden
@pytest.mark.skipif(not (golden_segllm_dir() / "seed0_wii_3rounds.npz").exists(), reason="no golden SegLLM files")
def test_int8_kl_on_the_golden_conversation_is_within_target(golden_segllm_checkpoints):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quantized_quality as Q

    golden = np.load(golden_segllm_dir() / "seed0_wii_3rounds.npz")
    rows = Q.measure(golden_segllm_checkpoints(0), golden, [v for v in Q.VARIANTS if v[0] == "int8"], sessions=False)
    print(rows)
    assert rows[0]["tokens"] == golden["r3_input_ids"].size
    assert rows[0]["kl_mean"] <= 0.01


def test_int8_masks_of_the_trained_checkpoint_match_float():
    """On the learning proof's trained checkpoint, an int8 session answers every round of two unseen MR-Shapes
    conversations with the float session's mask (IoU >= 0.99; ``benchmarks/quantized_quality.py --trained``
    measures 40 scenes). The golden model's random weights leave near-ties that bf16 alone flips."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quantized_quality as Q

    rows = Q.measure_trained(REPO / "checkpoints" / "tiny_mrshapes", 2, 4242, [v for v in Q.VARIANTS if v[0] == "int8"])
    print(rows)
    assert rows[0]["rounds"] >= 4 and rows[0]["min"] >= 0.99

