"""Stage-1 grounding conversations: every round names its target uniquely (given its ground-truth
reference), referring rounds need their reference, the files are deterministic and point at the train
split's images and register, and the benchmark's own splits are unchanged by them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np

from segllm_jax.data import mrshapes, referring
from segllm_jax.data.conversations import parse_decode, parse_placeholders
from segllm_jax.data.mrshapes_grounding import (
    ATTRIBUTE_FILE,
    GROUNDING_FILE,
    grounding_entry,
    grounding_rounds,
    write_grounding,
)


def test_rounds_are_unique_and_reference_dependent():
    kinds = Counter()
    for index in range(12):
        scene, _ = mrshapes.scene_and_conversation(3, "train", index)
        rounds = grounding_rounds(scene, np.random.default_rng(index), n_rounds=6)
        assert len(rounds) == 6 and rounds[0][2] is None
        for query, target, ref in rounds:
            assert mrshapes.resolve(scene, query, ref) == target
            if ref is not None:
                assert mrshapes.depends_on_reference(scene, query, ref)
                kinds["referring"] += 1
            else:
                kinds["attribute" if query.extreme is None else "superlative"] += 1
    assert min(kinds.values()) >= 8, kinds  # all three kinds of question occur


def test_entries_point_at_the_train_split(tmp_path):
    files = mrshapes.write_split(tmp_path, "train", 3, seed=5)
    register = json.loads(files.register.read_text())
    path = write_grounding(tmp_path, 3, seed=5)
    assert path == tmp_path / "conversations" / GROUNDING_FILE
    entries = json.loads(path.read_text())
    assert entries == [grounding_entry(5, i) for i in range(3)]  # deterministic
    for entry in entries:
        turns = entry["conversations"]
        assert len(turns) == 12
        for k, (human, gpt) in enumerate(zip(turns[::2], turns[1::2], strict=True)):
            placeholders, question = parse_placeholders(human["value"])
            assert question and not question.startswith("[")
            assert any(p.kind == "IMAGE256" for p in placeholders) == (k == 0)
            decode = parse_decode(parse_placeholders(gpt["value"])[0][0].payload)
            assert decode.target_id in register
            assert (tmp_path / "images" / decode.image).is_file()


def test_benchmark_splits_are_unchanged_by_grounding():
    """The test split's conversations are byte-identical to those written before the referring options were
    shared with the grounding generator (digest of the first 30 entries of seed 0, recorded then)."""
    entries = [mrshapes.scene_record(0, "test", i).entry for i in range(30)]
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    assert digest == "d65684ebdf70adb9a90e38dafcb9dd2daec6fa26d49a2a49c5d75705386ec265"


def test_attribute_only_conversations_ask_one_lookup(tmp_path):
    """The reading stage's file: the same scenes and targets' register, every round a direct attribute question
    (no superlative, no reference) wherever the scene has one, in its own file next to the grounding mix."""
    mrshapes.write_split(tmp_path, "train", 6, seed=5)
    path = write_grounding(tmp_path, 6, seed=5, attribute_only=True)
    assert path == tmp_path / "conversations" / ATTRIBUTE_FILE
    assert json.loads(path.read_text()) == [grounding_entry(5, i, attribute_only=True) for i in range(6)]
    shares = dict(attribute_share=1.0, referring_share=0.0)
    asked = Counter()
    for index in range(12):
        scene, _ = mrshapes.scene_and_conversation(5, "train", index)
        has_attribute = any(q.extreme is None for q, _ in referring.direct_options(scene))
        for query, target, ref in grounding_rounds(scene, np.random.default_rng(index), 6, **shares):
            assert ref is None and mrshapes.resolve(scene, query, None) == target
            assert (query.extreme is None) == has_attribute
            asked[query.extreme is None] += 1
    assert asked[True] >= 48, asked  # most scenes have an attribute question
