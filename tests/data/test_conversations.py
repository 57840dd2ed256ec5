"""Conversation JSON parsing (architecture.md §D1): payload forms, round structure, limit_rounds, refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from tokenizer_fixture import make_llama_tokenizer_dir

from segllm_jax.data import conversations as c
from segllm_jax.data import mrshapes
from segllm_jax.errors import InputError
from segllm_jax.prompt import ConversationEncoder, Round
from segllm_jax.tokenizer import SegTokenizer

IMG = "coco/train2014/COCO_train2014_000000000009.jpg"


def _entry(*turns: str, conv_id: str = "c0") -> dict:
    return {"id": conv_id, "task": "segmentation",
            "conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]}


def _released_style() -> dict:
    """Three rounds covering the three MASK-DECODE forms and a two-reference human turn."""
    return _entry(
        f"[IMAGE256:{IMG}] Segment the dog.", f"[MASK-DECODE:{IMG}|refcoco|11]",
        f"[MASK-ENCODE:{IMG}|refcoco|11][BOX-ENCODE:{IMG}|refcoco|11]Segment the ball near it.",
        f"[MASK-DECODE:near:11:12:{IMG}:refcoco]",
        f"[MASK-ENCODE:{IMG}|refcoco|11][BOX-ENCODE:{IMG}|refcoco|11]"
        f"[MASK-ENCODE:{IMG}|refcoco|12][BOX-ENCODE:{IMG}|refcoco|12]Segment what is between them.",
        f"[MASK-DECODE:between:11:12:13:{IMG}:refcoco]",
    )


def test_parse_released_style_conversation():
    conv = c.parse_conversation(_released_style())
    assert conv.conv_id == "c0" and conv.image == IMG and len(conv.rounds) == 3
    first, second, third = conv.rounds
    assert (first.question, first.image, first.references) == ("Segment the dog.", IMG, ())
    assert first.target == c.DecodeTarget(IMG, "refcoco", "11")
    assert second.references == (c.MaskRef(IMG, "refcoco", "11"),) and second.image is None
    assert second.target.supervised_ref_id == "11" and second.target.task_type == "near"
    assert [r.mask_id for r in third.references] == ["11", "12"]
    assert third.target.target_id == "13" and third.target.ref_ids == ("11", "12")
    assert third.target.supervised_ref_id == "11"  # two references: only the first is used (§O26)
    assert conv.tokenizer_rounds() == [Round("Segment the dog.", 0, True),
                                       Round("Segment the ball near it.", 1, False),
                                       Round("Segment what is between them.", 2, False)]


def test_limit_rounds_truncates():
    assert len(c.parse_conversation(_released_style(), limit_rounds=2).rounds) == 2
    assert len(c.parse_conversation(_released_style(), limit_rounds=6).rounds) == 3
    with pytest.raises(InputError):
        c.parse_conversation(_released_style(), limit_rounds=0)


def test_inference_dataset_is_parsed():
    conv = c.parse_conversation(_entry(f"[IMAGE256:{IMG}] Find it.", f"[MASK-DECODE:{IMG}|INFERENCE|0]"))
    assert conv.rounds[0].target.dataset == c.INFERENCE_DATASET


def test_other_brackets_are_text_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=c.__name__):
        conv = c.parse_conversation(_entry(f"[IMAGE256:{IMG}] Segment [the] dog.", f"[MASK-DECODE:{IMG}|d|1]"))
    assert conv.rounds[0].question == "Segment [the] dog."
    assert "Ignoring bracket [the]" in caplog.text


@pytest.mark.parametrize("turns, message", [
    ((f"Segment [IMAGE256:{IMG}] it.", f"[MASK-DECODE:{IMG}|d|1]"), "open the human turn"),
    ((f"[IMAGE256:{IMG}] a", f"[MASK-DECODE:{IMG}|d|1]",
      f"[MASK-ENCODE:{IMG}|d|1]b", f"[MASK-DECODE:{IMG}|d|2]"), "pairs"),
    ((f"[IMAGE256:{IMG}] a", f"[MASK-DECODE:{IMG}|d|1]",
      f"[BOX-ENCODE:{IMG}|d|1][MASK-ENCODE:{IMG}|d|1]b", f"[MASK-DECODE:{IMG}|d|2]"), "pairs"),
    ((f"[IMAGE256:{IMG}] a", f"[MASK-DECODE:{IMG}|d|1]",
      f"[MASK-ENCODE:{IMG}|d|1][BOX-ENCODE:{IMG}|d|3]b", f"[MASK-DECODE:{IMG}|d|2]"), "same mask"),
    ((f"[IMAGE256:{IMG}] a", f"Sure: [MASK-DECODE:{IMG}|d|1]"), "exactly one MASK-DECODE"),
    ((f"[IMAGE256:{IMG}] a", f"[MASK-DECODE:{IMG}|d|1][MASK-DECODE:{IMG}|d|2]"), "exactly one MASK-DECODE"),
    ((f"[IMAGE256:{IMG}] a", "[MASK-DECODE:other.jpg|d|1]"), "several images"),
    (("a", f"[MASK-DECODE:{IMG}|d|1]"), "IMAGE256"),
    ((f"[IMAGE256:{IMG}] a", f"[MASK-DECODE:{IMG}|d]"), "three forms"),
    ((f"[IMAGE256:{IMG}] a",), "even"),
])
def test_unreproducible_structures_are_refused(turns, message):
    with pytest.raises(InputError, match=message):
        c.parse_conversation(_entry(*turns))


def test_wrong_turn_order_is_refused():
    entry = _released_style()
    entry["conversations"][0]["from"] = "gpt"
    with pytest.raises(InputError, match="alternate"):
        c.parse_conversation(entry)


def test_mrshapes_json_parses_to_its_rounds(tmp_path):
    files = mrshapes.write_split(tmp_path, "val", 3, seed=5)
    for index, entry in enumerate(c.read_conversations(files.conversations)):
        _, truth = mrshapes.scene_and_conversation(5, "val", index)
        conv = c.parse_conversation(entry)
        assert [r.question for r in conv.rounds] == [r.question for r in truth.rounds]
        assert [len(r.references) for r in conv.rounds] == [int(r.ref_round is not None) for r in truth.rounds]
        for parsed in conv.rounds[1:]:
            assert parsed.references[0].mask_id == parsed.target.supervised_ref_id


def test_rounds_feed_the_conversation_encoder(tmp_path):
    tokenizer = SegTokenizer.from_pretrained(make_llama_tokenizer_dir(tmp_path / "tok", with_config=True))
    encoded = ConversationEncoder(tokenizer).encode(c.parse_conversation(_released_style()).tokenizer_rounds())
    ids = encoded.input_ids
    assert int(np.sum(ids == tokenizer.video_id)) == 256 + 2 * (1 + 2)
    assert int(np.sum(ids == tokenizer.seg_id)) == 3
    assert [layout.mask_encode_positions.size for layout in encoded.rounds] == [0, 1, 2]
