"""The HIPIE converter table (``segllm_jax_convert.hipie``) through the real engine.

Happy paths: the golden recipe (every key of ``state_dict_keys.json``, BERT included) as a .pth;
a SegLLM-prefixed state dict; a 900-row ``tgt_embed`` (architecture.md §O1, sliced and logged); a checkpoint
holding only one name of each shared head (§O12). Error paths: missing, extra, mis-shaped and
mistyped keys and differing aliases each raise one ``ConversionError`` naming the key, and
nothing reaches the model. Also the parameter count (§A2: ~56.9 M without FrozenBN buffers).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from segllm_jax.config import HipieConfig
from segllm_jax.errors import ConversionError
from segllm_jax.models.hipie.heads import make_iou_head
from segllm_jax.models.hipie.model import Hipie
from segllm_jax_convert.engine import convert, flat_targets
from segllm_jax_convert.hipie import HIPIE_TABLE, SEGLLM_PREFIX, hipie_table_for
from segllm_jax_convert.io import TensorInfo, TensorSource, open_checkpoint

from .conftest import golden_dir, load_recipe_module

pytestmark = pytest.mark.skipif(not (golden_dir() / "state_dict_keys.json").exists(),
                                reason="golden state_dict_keys.json not available")


@functools.lru_cache(maxsize=1)
def _key_entries() -> tuple:
    return tuple(json.loads((golden_dir() / "state_dict_keys.json").read_text())["keys"])


@functools.lru_cache(maxsize=1)
def _recipe_no_bert() -> dict[str, np.ndarray]:
    """The recipe's arrays without BERT (BERT keys are matched by the ignore list by name only)."""
    recipe = load_recipe_module()
    entries = [e for e in _key_entries() if not e["key"].startswith("text_encoder.")]
    return recipe.make_state_dict(entries, 0)


@functools.lru_cache(maxsize=1)
def _targets() -> dict:
    return flat_targets(nnx.eval_shape(lambda: Hipie(HipieConfig.hipie_r50_segllm(), rngs=nnx.Rngs(0))))


def _source(arrays: dict[str, np.ndarray]) -> TensorSource:
    where = Path("<memory>")
    infos = {k: TensorInfo(tuple(v.shape), v.dtype, where) for k, v in arrays.items()}
    return TensorSource(infos, {where: lambda k: arrays[k]})


def _convert(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return convert(_source(arrays), hipie_table_for(list(arrays)), _targets(), progress=False)


def test_parameter_count() -> None:
    targets = _targets()
    total = sum(int(np.prod(t.shape)) for t in targets.values())
    frozen_bn = sum(int(np.prod(t.shape)) for p, t in targets.items()
                    if p.startswith("backbone/") and "/norm/" in p)
    # every tensor the model needs, each shared head counted once (§O12), resizers excluded
    expected = sum(int(np.prod(e["shape"])) for e in _key_entries()
                   if not e["key"].startswith(("text_encoder.", "criterion.")) and "resizer." not in e["key"]
                   and not e["alias_of"])
    print(f"\nHipie parameters: {total:,} ({total - frozen_bn:,} without the {frozen_bn:,} FrozenBN buffers)")
    assert total == expected == 56_978_184
    assert round((total - frozen_bn) / 1e6, 1) == 56.9  # §A2


def test_recipe_pth_converts_every_target(recipe_pth) -> None:
    source = open_checkpoint(recipe_pth(0))
    arrays = convert(source, hipie_table_for(list(source)), _targets(), progress=False)
    assert set(arrays) == set(_targets())
    sd = _recipe_no_bert()
    np.testing.assert_array_equal(arrays["decoder/layers/3/self_attn/in_proj/kernel"],
                                  sd["detr.detr.transformer.decoder.layers.3.self_attn.in_proj_weight"].T)
    np.testing.assert_array_equal(arrays["mask_head/lay2/kernel"],
                                  sd["detr.mask_head.lay2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(arrays["class_embed/6/body/kernel"], sd["detr.detr.class_embed.6.body.weight"].T)


def test_segllm_prefixed_state_dict_converts() -> None:
    bare = _recipe_no_bert()
    prefixed = {SEGLLM_PREFIX + k: v for k, v in bare.items()}
    prefixed["model.segmentator_predictor.0.weight"] = np.zeros((8, 8), np.float32)  # projector: not HIPIE
    prefixed["model.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 8), np.float32)  # LLM: not HIPIE
    table = hipie_table_for(list(prefixed))
    assert table is not HIPIE_TABLE
    got = convert(_source(prefixed), table, _targets(), progress=False)
    want = _convert(bare)
    assert set(got) == set(want)
    for k in ("decoder/two_stage/tgt_embed/embedding", "backbone/stem/conv1/kernel", "iou_head/5/bias"):
        np.testing.assert_array_equal(got[k], want[k])


def test_900_query_table_is_sliced_and_logged(caplog) -> None:
    sd = dict(_recipe_no_bert())
    big = np.random.default_rng(1).normal(size=(900, 256)).astype(np.float32)
    sd["detr.detr.transformer.tgt_embed.weight"] = big
    with caplog.at_level(logging.WARNING, logger="segllm_jax_convert.hipie"):
        arrays = _convert(sd)
    np.testing.assert_array_equal(arrays["decoder/two_stage/tgt_embed/embedding"], big[:100])
    messages = [r.getMessage() for r in caplog.records if r.name == "segllm_jax_convert.hipie"]
    assert len(messages) == 1 and "900 rows" in messages[0] and "§O1" in messages[0]


def test_one_name_per_shared_head_is_enough() -> None:
    sd = {k: v for k, v in _recipe_no_bert().items() if not k.startswith("detr.detr.transformer.decoder.bbox_embed.")
          and not k.startswith("detr.detr.transformer.decoder.class_embed.")}
    arrays = _convert(sd)
    assert set(arrays) == set(_targets())


def _expect_error(sd: dict[str, np.ndarray], *fragments: str) -> None:
    written: dict[str, np.ndarray] = {}
    with pytest.raises(ConversionError) as e:
        written.update(_convert(sd))
    msg = str(e.value)
    print(f"\n{msg}")
    for f in fragments:
        assert f in msg
    assert "nothing was written" in msg and not written


def test_missing_key() -> None:
    sd = dict(_recipe_no_bert())
    del sd["detr.controller.layers.2.bias"]
    _expect_error(sd, "model parameters that no checkpoint key fills (1)", "controller/layers/2/bias")


def test_extra_key() -> None:
    sd = dict(_recipe_no_bert())
    sd["detr.detr.transformer.decoder.layers.6.norm1.weight"] = np.ones(256, np.float32)  # a 7th layer
    _expect_error(sd, "decoder.layers.6.norm1.weight", "decoder/layers/6/norm1/scale")
    sd = dict(_recipe_no_bert())
    sd["detr.detr.something_new.weight"] = np.ones(4, np.float32)
    _expect_error(sd, "no rule maps and no ignore entry covers (1)", "detr.detr.something_new.weight")


def test_wrong_shape() -> None:
    sd = dict(_recipe_no_bert())
    sd["detr.controller.layers.2.weight"] = np.zeros((168, 256), np.float32)
    _expect_error(sd, "shape/dtype mismatches", "detr.controller.layers.2.weight: shape (168, 256)",
                  "controller/layers/2/kernel needs (256, 169)")


def test_wrong_dtype() -> None:
    sd = dict(_recipe_no_bert())
    sd["detr.detr.iou_head.5.bias"] = np.zeros((1,), np.int64)
    _expect_error(sd, "detr.detr.iou_head.5.bias: dtype int64 cannot fill iou_head/5/bias of dtype float32")


def test_differing_aliases() -> None:
    sd = dict(_recipe_no_bert())
    key = "detr.detr.transformer.decoder.bbox_embed.3.layers.0.bias"
    sd[key] = sd[key] + 1.0
    with pytest.raises(ConversionError, match="conflicting aliases; nothing was written") as e:
        _convert(sd)
    assert key in str(e.value) and "bbox_embed/3/layers/0/bias" in str(e.value)


class _IouHeads(nnx.Module):
    """A small concrete stand-in for ``Hipie`` (building the full model eagerly costs tens of seconds)."""

    def __init__(self) -> None:
        self.iou_head = make_iou_head(HipieConfig.hipie_r50_segllm(), nnx.Rngs(0))


def test_failed_conversion_leaves_model_untouched(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from segllm_jax_convert.engine import load_arrays

    sd = {k: torch.from_numpy(v) for k, v in _recipe_no_bert().items() if k.startswith("detr.detr.iou_head.")}
    sd["detr.detr.iou_head.5.weight"] = torch.zeros(2, 256)  # the one bad tensor, last in the file
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    model = _IouHeads()
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    source = open_checkpoint(bad)
    with pytest.raises(ConversionError, match="iou_head/5/kernel needs"):
        load_arrays(model, convert(source, hipie_table_for(list(source)), flat_targets(model), progress=False))
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
