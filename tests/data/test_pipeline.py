"""Input pipeline: example contents (architecture.md §D5, §D6, §T1), sampler (§T13), sharding, determinism,
resume, worker processes, and skipping of corrupt data."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image
from tokenizer_fixture import make_llama_tokenizer_dir

from segllm_jax.data import mrshapes
from segllm_jax.data import pipeline as p
from segllm_jax.data.conversations import parse_conversation
from segllm_jax.data.example import Example, collate_inputs, encoded_conversation
from segllm_jax.data.registers import RegisterSpec
from segllm_jax.errors import ConfigError, InputError
from segllm_jax.preprocess import clip_image, hipie_image, hipie_mask, masked_crop
from segllm_jax.prompt import ConversationEncoder
from segllm_jax.tokenizer import SegTokenizer

SEED = 3
N_SCENES = 8
CLIP = 32  # small CLIP crops keep the tests fast; the model uses 224
FRAME = 128  # small HIPIE frame for the sampler tests; the example test uses the real 1024


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, mrshapes.SplitFiles, SegTokenizer]:
    """MR-Shapes scenes 0-3 in a.json and 4-7 in b.json, one register, and a LLaMA tokenizer."""
    root = tmp_path_factory.mktemp("mixture")
    files = mrshapes.write_split(root, "train", N_SCENES, SEED)
    entries = mrshapes.read_conversations(files.conversations)
    (root / "conversations/a.json").write_text(json.dumps(entries[:4]))
    (root / "conversations/b.json").write_text(json.dumps(entries[4:]))
    tokenizer = SegTokenizer.from_pretrained(make_llama_tokenizer_dir(root / "tok", with_config=True))
    return root, files, tokenizer


def _config(root: Path, *names: str) -> p.MixtureConfig:
    return p.MixtureConfig(conversations=tuple(p.ConversationFile(n) for n in names or ("a.json", "b.json")),
                           registers=(RegisterSpec("mrshapes", "mrshapes_train.json"),),
                           images_root=str(root / "images"), annotations_root=str(root / "annotations"),
                           conversations_root=str(root / "conversations"))


def _pipeline(data, *names: str, **kwargs) -> p.Pipeline:
    root, _, tokenizer = data
    options = {"batch_size": 2, "clip_size": CLIP, "frame": FRAME, "num_epochs": 2, **kwargs}
    return p.Pipeline.from_config(_config(root, *names), tokenizer, **options)


def _records(batches) -> list[tuple[int, list[int]]]:
    return [(b["file_index"], [int(e.record_index) for e in b["examples"]]) for b in batches]


def _assert_same_batches(left, right) -> None:
    assert _records(left) == _records(right)
    for a, b in zip(left, right, strict=True):
        for x, y in zip(a["examples"], b["examples"], strict=True):
            assert type(x) is type(y) is Example
            for key in (f.name for f in dataclasses.fields(x)):
                np.testing.assert_array_equal(np.asarray(getattr(x, key)), np.asarray(getattr(y, key)), err_msg=key)


# ---------------------------------------------------------------------------------------------
# examples


def test_example_contents_follow_the_spec(data):
    root, _, tokenizer = data
    builder = p.Pipeline.from_config(_config(root), tokenizer, batch_size=1, clip_size=CLIP).loader.builder
    entry = json.loads((root / "conversations/a.json").read_text())[1]
    example = builder.build(entry)
    scene, conv = mrshapes.scene_and_conversation(SEED, "train", 1)
    n, r, s = len(conv.rounds), len(conv.rounds) - 1, 1024
    shapes = {"clip_image": (CLIP, CLIP, 3), "hipie_image": (s, s, 3), "ref_crops": (r, CLIP, CLIP, 3),
              "ref_boxes": (r, 4), "target_masks": (n, s, s), "aux_masks": (n, s, s), "has_aux": (n,),
              "seg_positions": (n,), "round_ends": (n,), "image_positions": (256,), "ref_rounds": (r,)}
    for key, shape in shapes.items():
        assert getattr(example, key).shape == shape, key
    assert example.hipie_image.dtype == np.uint8 and example.target_masks.dtype == bool
    assert example.clip_image.dtype == example.ref_crops.dtype == np.float32

    ids, labels = example.input_ids, example.labels
    assert np.all(ids[example.seg_positions] == tokenizer.seg_id)
    assert np.all(labels[example.seg_positions] == tokenizer.seg_id)
    for key in ("image_positions", "ref_mask_positions", "ref_box_positions"):
        assert np.all(ids[getattr(example, key)] == tokenizer.video_id)
    reference = ConversationEncoder(tokenizer).encode(parse_conversation(entry).tokenizer_rounds())
    rebuilt = encoded_conversation(example)
    np.testing.assert_array_equal(rebuilt.input_ids, reference.input_ids)
    for mine, theirs in zip(rebuilt.rounds, reference.rounds, strict=True):
        assert (mine.start, mine.end, mine.seg_position) == (theirs.start, theirs.end, theirs.seg_position)
        np.testing.assert_array_equal(mine.mask_encode_positions, theirs.mask_encode_positions)
        np.testing.assert_array_equal(mine.image_positions, theirs.image_positions)

    np.testing.assert_array_equal(example.hipie_image, hipie_image(Image.fromarray(scene.image))[0])
    framed = lambda i: hipie_mask(scene.mask(i)) > 0  # noqa: E731
    np.testing.assert_array_equal(example.has_aux, [False] + [True] * r)
    for k, round_ in enumerate(conv.rounds):
        np.testing.assert_array_equal(example.target_masks[k], framed(round_.target))
        if k:
            ref = conv.reference_instance(k)
            np.testing.assert_array_equal(example.aux_masks[k], framed(ref))
            rows, cols = np.nonzero(framed(ref))
            np.testing.assert_allclose(example.ref_boxes[k - 1],
                                       np.array([rows.min(), cols.min(), rows.max(), cols.max()]) / s)
            rr, cc = np.nonzero(scene.mask(ref))
            crop = masked_crop(scene.image, scene.mask(ref), (cc.min(), rr.min(), cc.max() + 1, rr.max() + 1))
            np.testing.assert_array_equal(example.ref_crops[k - 1], clip_image(crop, CLIP))
    assert not example.aux_masks[0].any()


def test_collate_accepts_pipeline_examples(data):
    from segllm_jax.batch import collate

    batch = next(iter(_pipeline(data)))
    examples = batch["examples"]
    conversations, clip_images, image_of_row, references = collate_inputs(examples)
    packed = collate(conversations, clip_images, image_of_row, references)
    assert packed.input_ids.shape == (2, max(e.input_ids.size for e in examples))
    assert packed.seg_rows.shape[0] == sum(e.seg_positions.size for e in examples)
    assert packed.ref_crops.shape[0] == sum(e.ref_rounds.size for e in examples)


def test_rounds_beyond_max_length_are_cut(data):
    root, _, tokenizer = data
    entry = json.loads((root / "conversations/a.json").read_text())[0]
    full = ConversationEncoder(tokenizer).encode(parse_conversation(entry).tokenizer_rounds())
    builder = p.Pipeline.from_config(_config(root), tokenizer, batch_size=1, clip_size=CLIP, frame=FRAME,
                                     max_length=full.rounds[1].end - 1).loader.builder  # only round 1 fits
    example = builder.build(entry)
    assert example.seg_positions.size == 1 and example.target_masks.shape[0] == 1
    assert example.input_ids.size == full.rounds[0].end and example.ref_rounds.size == 0
    builder.max_length = 100
    with pytest.raises(InputError, match="exceeds"):
        builder.build(entry)


# ---------------------------------------------------------------------------------------------
# sampler


def test_plan_one_file_per_step_uniform_over_files():
    plan = p.BatchPlan((100, 10), batch_size=2, shard_count=2, seed=1)
    assert plan.steps_per_epoch == 110 // 4
    files = [plan.host_batch(e, s)[0] for e in range(20) for s in range(plan.steps_per_epoch)]
    assert 0.4 < np.mean(files) < 0.6  # uniform over files, not proportional to their size
    for epoch in range(3):
        for step in range(plan.steps_per_epoch):
            file_index, records = plan.host_batch(epoch, step)
            assert records.shape == (2,) and np.all(records < plan.file_lengths[file_index])
    weighted = p.BatchPlan((100, 10), batch_size=2, weights=(1.0, 0.0))
    assert {weighted.host_batch(0, s)[0] for s in range(weighted.steps_per_epoch)} == {0}
    with pytest.raises(ConfigError):
        p.BatchPlan((3,), batch_size=2, shard_count=2)
    with pytest.raises(ConfigError):
        p.BatchPlan((8,), batch_size=2, shard_index=2, shard_count=2)


def test_plan_hosts_are_disjoint():
    single = [p.BatchPlan((40,), batch_size=3, shard_index=h, shard_count=2, seed=5) for h in range(2)]
    seen = [np.concatenate([plan.host_batch(0, s)[1] for s in range(plan.steps_per_epoch)]) for plan in single]
    assert not set(seen[0]) & set(seen[1])  # a whole epoch of one file: nothing shared
    assert len(set(seen[0]) | set(seen[1])) == 6 * single[0].steps_per_epoch
    mixed = [p.BatchPlan((9, 30, 5), batch_size=2, shard_index=h, shard_count=2, seed=5) for h in range(2)]
    for epoch in range(3):
        for step in range(mixed[0].steps_per_epoch):
            (f0, r0), (f1, r1) = (plan.host_batch(epoch, step) for plan in mixed)
            assert f0 == f1 and not set(r0) & set(r1)


def test_pipeline_batches_come_from_one_file_and_hosts_split_them(data):
    hosts = [list(_pipeline(data, batch_size=1, shard_index=h, shard_count=2)) for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 2 * (N_SCENES // 2)
    for b0, b1 in zip(*hosts, strict=True):
        assert b0["file_index"] == b1["file_index"]
        assert {e.conv_id for e in b0["examples"]}.isdisjoint(e.conv_id for e in b1["examples"])
    whole = list(_pipeline(data, batch_size=2))
    for batch in whole:
        assert len(batch["examples"]) == 2
        assert {int(e.file_index) for e in batch["examples"]} == {batch["file_index"]}
        assert {int(e.conv_id[-6:]) // 4 for e in batch["examples"]} == {batch["file_index"]}  # a: 0-3, b: 4-7
    # the two hosts' slices are exactly the single-host global batch
    assert [r0 + r1 for (_, r0), (_, r1) in zip(_records(hosts[0]), _records(hosts[1]), strict=True)] == \
        [r for _, r in _records(whole)]


def test_same_seed_same_batches(data):
    first, again, other = (list(_pipeline(data, seed=s)) for s in (7, 7, 8))
    _assert_same_batches(first, again)
    assert _records(first) != _records(other)


# ---------------------------------------------------------------------------------------------
# resume and workers


def test_get_state_set_state_resumes_exactly(data):
    iterator = iter(_pipeline(data))
    head = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    rest = list(iterator)
    resumed = iter(_pipeline(data))
    resumed.set_state(json.loads(json.dumps(state)))  # states are plain JSON (checkpointable)
    _assert_same_batches(list(resumed), rest)
    assert len(head) + len(rest) == 2 * N_SCENES // 2


def test_worker_processes_give_the_same_elements(data):
    """One spawn of two workers only (seconds on a loaded CPU); resume is tested with 0 workers."""
    iterator = iter(_pipeline(data, worker_count=2))
    try:
        batches = list(iterator)
    finally:
        iterator.close()
    _assert_same_batches(batches, list(_pipeline(data)))


# ---------------------------------------------------------------------------------------------
# corrupt data


def _corrupt_files(root: Path) -> None:
    """good.json: the four scenes of a.json plus broken entries; bad.json: broken entries only."""
    good = json.loads((root / "conversations/a.json").read_text())
    template = json.dumps(good[0])
    image = "mrshapes/train/000000.png"
    missing_image = json.loads(template.replace(image, "mrshapes/train/absent.png"))
    truncated_image = json.loads(template.replace(image, "mrshapes/train/truncated.png"))
    missing_mask = json.loads(template.replace("train_000000_", "train_999999_"))
    bad_turns = json.loads(template)
    bad_turns["conversations"][1]["value"] = "no placeholder"
    broken = [missing_image, truncated_image, missing_mask, bad_turns, {"id": "x"}, "not a dict"]
    png = (root / "images" / image).read_bytes()
    (root / "images/mrshapes/train/truncated.png").write_bytes(png[: len(png) // 2])
    (root / "conversations/good.json").write_text(json.dumps(good + broken[:2]))
    (root / "conversations/bad.json").write_text(json.dumps(broken))


def test_corrupt_entries_are_skipped_and_counted(data, caplog):
    _corrupt_files(data[0])
    with caplog.at_level(logging.WARNING, logger=p.__name__):
        iterator = iter(_pipeline(data, "good.json", "bad.json", num_epochs=3))
        batches = list(iterator)
    assert batches and iterator.skipped > 0
    assert caplog.text.count("skipped conversation") == iterator.skipped
    for reason in ("absent.png", "truncated.png", "train_999999_", "MASK-DECODE", "even, non-zero"):
        assert reason in caplog.text, reason
    assert {b["file_index"] for b in batches} == {0}  # every draw from bad.json fails: those steps vanish
    assert all(len(b["examples"]) == 2 for b in batches)  # failed draws were replaced from the same file
    assert all(e.conv_id.startswith("mrshapes_train_00000") for b in batches for e in b["examples"])


# ---------------------------------------------------------------------------------------------
# config


def test_mixture_config_from_original_yaml(tmp_path):
    (tmp_path / "conv.yaml").write_text("datasets:\n  - name: mr_refcoco_train.json\n  - name: mr_paco_data.json\n")
    (tmp_path / "anno.yaml").write_text("datasets:\n  - name: refcoco\n    path: refcoco/instances.json\n")
    config = p.MixtureConfig.from_yaml(tmp_path / "conv.yaml", tmp_path / "anno.yaml", images_root="i",
                                       annotations_root="a", conversations_root="c")
    assert config.conversations == (p.ConversationFile("mr_refcoco_train.json"),
                                    p.ConversationFile("mr_paco_data.json"))
    assert config.registers == (RegisterSpec("refcoco", "refcoco/instances.json"),)
    assert config.limit_rounds == 6
    (tmp_path / "bad.yaml").write_text("datasets: 3\n")
    with pytest.raises(ConfigError):
        p.MixtureConfig.from_yaml(tmp_path / "bad.yaml", tmp_path / "anno.yaml", images_root="i",
                                  annotations_root="a")


def test_source_is_random_access_over_files(data):
    root = data[0]
    source = p.ConversationSource([root / "conversations/a.json", root / "conversations/b.json"], max_per_file=3)
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    assert source.file_lengths == (3, 3) and len(source) == 6
    assert source[4] == source.entry(1, 1) == json.loads((root / "conversations/b.json").read_text())[1]
    clone = pickle.loads(pickle.dumps(source))  # workers get paths, and read the files themselves
    assert clone._entries is None and clone[0] == source[0]


def test_missing_conversation_file_is_a_config_error(data):
    with pytest.raises(ConfigError, match="absent.json"):
        _pipeline(data, "absent.json")
