"""TFDS sources: MR-Shapes written and read as a TFDS dataset (same conversations, masks and training
examples as the JSON layout), a ref_coco-shaped dataset as single-round conversations (corrupt records
skipped and counted), both in one mixture, the make-mrshapes command, and no TensorFlow anywhere."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tokenizer_fixture import make_llama_tokenizer_dir

from segllm_jax.apps import cli
from segllm_jax.data import mrshapes
from segllm_jax.data import pipeline as p
from segllm_jax.data.conversations import parse_conversation
from segllm_jax.data.example import Example
from segllm_jax.data.registers import RegisterSpec
from segllm_jax.data.tfds_sources import MRShapesConversations, RefCocoConversations, open_conversations, write_mrshapes
from segllm_jax.errors import ConfigError, InputError
from segllm_jax.preprocess import hipie_mask
from segllm_jax.tokenizer import SegTokenizer

SEED = 5
SIZES = {"train": 4, "val": 2}
CLIP, FRAME = 32, 64  # small crops and HIPIE frame: these tests compare layouts, not resolutions


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path, SegTokenizer]:
    """(JSON root, TFDS dataset folder, tokenizer) of the same MR-Shapes splits."""
    root = tmp_path_factory.mktemp("mrshapes")
    mrshapes.write_splits(root, SIZES, SEED)
    folder = write_mrshapes(root / "tfds", SIZES, SEED)
    tokenizer = SegTokenizer.from_pretrained(make_llama_tokenizer_dir(root / "tok", with_config=True))
    return root, folder, tokenizer


# ---------------------------------------------------------------------------------------------
# A ref_coco-shaped dataset: the real builder's features, records made from MR-Shapes scenes.

# image id -> ([(shape index or None for an empty mask, refexps)], corrupt image, corrupt first mask)
REF_RECORDS = {
    101: ([(0, ["the first one", "that one again"]), (1, ["the second one"])], False, False),
    102: ([(0, ["unreadable mask"])], False, True),
    103: ([(0, ["unreadable image"])], True, False),
    104: ([(None, ["a mask without pixels"]), (1, ["a fine one"])], False, False),
}
BAD_IMAGE = b"\xff\xd8 not a jpeg"
REF_PAIRS = 6  # (object, refexp) pairs outside record 102, whose mask cannot be decoded
# conversation id -> (image id, object, refexp) of every pair that can be indexed; the builder stores
# records in TFDS's shuffled order (as the real ref_coco), so tests find pairs by id, not position
REF_IDS = {f"ref_coco_{i}_{10 * i + j}_{100 * i + 10 * j + k}": (i, j, raw)
           for i, (objects, _, _) in REF_RECORDS.items() if i != 102
           for j, (_, refexps) in enumerate(objects) for k, raw in enumerate(refexps)}


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _ref_scene(image_id: int) -> mrshapes.Scene:
    return mrshapes.scene_and_conversation(SEED, "test", image_id - 101)[0]


def _ref_object_mask(scene: mrshapes.Scene, shape: int | None) -> np.ndarray:
    return scene.mask(shape) if shape is not None else np.zeros(scene.instance_map.shape, bool)


def _ref_coco_record(image_id: int) -> dict:
    objects_spec, bad_image, bad_mask = REF_RECORDS[image_id]
    scene = _ref_scene(image_id)
    objects = []
    for j, (shape, refexps) in enumerate(objects_spec):
        mask = _ref_object_mask(scene, shape)
        objects.append({
            "id": 10 * image_id + j, "area": int(mask.sum()), "label": 1, "gt_box_index": j,
            "bbox": tfds.features.BBox(0.1, 0.1, 0.6, 0.6),
            "mask": b"not a png" if bad_mask and j == 0 else _encoded(mask, "PNG"),
            "refexp": [{"refexp_id": 100 * image_id + 10 * j + k, "raw": raw} for k, raw in enumerate(refexps)],
        })
    coco = [{k: o[k] for k in ("id", "area", "bbox", "label")} for o in objects]
    image = BAD_IMAGE if bad_image else _encoded(scene.image, "JPEG")
    return {"image": image, "image/id": image_id, "objects": objects, "coco_annotations": coco}


@pytest.fixture(scope="module")
def ref_coco(tmp_path_factory) -> Path:
    """Prepared tiny ``ref_coco/refcoco_unc`` (array_record): TFDS's own builder, our records."""

    class TinyRefCoco(tfds.builder_cls("ref_coco"), skip_registration=True):
        name = "ref_coco"
        code_path = None  # no checksums file to look for (see segllm_jax.data.tfds_sources)

        def _split_generators(self, dl_manager):
            return {"train": ((i, _ref_coco_record(i)) for i in REF_RECORDS)}

    builder = TinyRefCoco(config="refcoco_unc", data_dir=str(tmp_path_factory.mktemp("tfds")),
                          file_format="array_record")
    # tfds 4.9.10 serialises a sequence of sequences (refexps per object) through a TensorFlow dtype
    # lookup; real ref_coco datasets are prepared by TFDS with TF, this lets the test write one without.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds.core.features.TensorInfo, "dtype", property(lambda info: info.np_dtype))
        builder.download_and_prepare()
    return Path(builder.data_dir)


# ---------------------------------------------------------------------------------------------
# helpers


def _config(*files: p.ConversationFile, root: Path | None = None) -> p.MixtureConfig:
    """A mixture; registers and folders only matter for JSON files (TFDS records carry their data)."""
    return p.MixtureConfig(conversations=files, registers=(RegisterSpec("mrshapes", "mrshapes_train.json"),),
                           images_root=str(root / "images") if root else "-",
                           annotations_root=str(root / "annotations") if root else "-",
                           conversations_root=str(root / "conversations") if root else ".")


def _pipeline(tokenizer: SegTokenizer, config: p.MixtureConfig, **kwargs) -> p.Pipeline:
    options = {"batch_size": 2, "clip_size": CLIP, "frame": FRAME, "num_epochs": 2, "seed": 1, **kwargs}
    return p.Pipeline.from_config(config, tokenizer, **options)


def _examples(batches: list[dict]) -> list[Example]:
    return [example for batch in batches for example in batch["examples"]]


# ---------------------------------------------------------------------------------------------
# MR-Shapes


@pytest.mark.parametrize("split, tfds_split", [("train", "train"), ("val", "validation")])
def test_tfds_split_holds_the_json_conversations(shapes, split, tfds_split):
    root, folder, _ = shapes
    table = open_conversations(folder, tfds_split)
    assert isinstance(table, MRShapesConversations) and table.name == f"mrshapes/1.0.0:{tfds_split}"
    entries = mrshapes.read_conversations(root / f"conversations/mrshapes_{split}.json")
    register = mrshapes.read_register(root / f"annotations/mrshapes_{split}.json")
    assert len(table) == len(entries) == SIZES[split]
    for index, entry in enumerate(entries):
        record = table[index]
        assert record.entry == entry
        image = parse_conversation(entry).image
        assert record.image == (root / "images" / image).read_bytes()
        assert record.masks.keys() == {m for m in register if m.startswith(f"{split}_{index:06d}_")}
        for mask_id, mask in record.masks.items():
            assert mask.dtype == bool
            np.testing.assert_array_equal(mask, mrshapes.load_mask(register, mask_id), err_msg=mask_id)
    assert len(open_conversations(folder, tfds_split, limit=1)) == 1
    with pytest.raises(IndexError):
        table[SIZES[split]]


def test_tfds_and_json_give_identical_training_examples(shapes):
    root, folder, tokenizer = shapes
    from_json = list(_pipeline(tokenizer, _config(p.ConversationFile("mrshapes_train.json"), root=root)))
    from_tfds = list(_pipeline(tokenizer, _config(p.ConversationFile(str(folder), tfds_split="train"))))
    assert len(from_json) == len(from_tfds) == 2 * SIZES["train"] // 2
    json_examples, tfds_examples = _examples(from_json), _examples(from_tfds)
    assert len(json_examples) == len(tfds_examples) == 2 * SIZES["train"]
    assert sorted(e.conv_id for e in json_examples) == sorted([f"mrshapes_train_{i:06d}" for i in range(4)] * 2)
    for x, y in zip(json_examples, tfds_examples, strict=True):
        assert type(x) is type(y) is Example and x.target_masks.any()
        for key in (f.name for f in dataclasses.fields(x)):
            np.testing.assert_array_equal(np.asarray(getattr(x, key)), np.asarray(getattr(y, key)), err_msg=key)


def test_export_is_deterministic_and_guards_its_folder(shapes, tmp_path):
    _, folder, _ = shapes
    again = write_mrshapes(tmp_path, SIZES, SEED)
    shards = sorted(f.name for f in folder.glob("*.array_record-*"))
    assert shards == sorted(f.name for f in again.glob("*.array_record-*")) and len(shards) == 2
    for name in shards:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    assert write_mrshapes(tmp_path, SIZES, SEED) == again  # same request: the prepared folder is kept
    with pytest.raises(InputError, match="already holds"):
        write_mrshapes(tmp_path, SIZES, SEED + 1)
    other = write_mrshapes(tmp_path / "other", {"train": 1}, SEED + 1)
    assert open_conversations(other, "train")[0].image != open_conversations(again, "train")[0].image
    with pytest.raises(InputError, match="split must be one of"):
        write_mrshapes(tmp_path / "bad", {"validation": 1}, SEED)


def test_open_rejects_what_it_cannot_read(shapes, tmp_path):
    _, folder, _ = shapes
    with pytest.raises(ConfigError, match="not a prepared TFDS dataset"):
        open_conversations(tmp_path / "absent", "train")
    with pytest.raises(ConfigError, match="not 'test'"):
        open_conversations(folder, "test")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    info = json.loads((copy / "dataset_info.json").read_text())
    (copy / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(ConfigError, match="needs array_record"):
        open_conversations(copy, "train")


def test_make_mrshapes_command_writes_json_and_tfds(tmp_path, capsys):
    argv = ["make-mrshapes", "--out", str(tmp_path), "--seed", str(SEED), "--train", "1", "--validation", "2",
            "--test", "0", "--max-rounds", "3", "--tfds"]
    assert cli.main(argv) == 0
    folder = tmp_path / "tfds/mrshapes/1.0.0"
    assert str(folder) in capsys.readouterr().out
    entries = mrshapes.read_conversations(tmp_path / "conversations/mrshapes_val.json")
    assert [r.entry for r in open_conversations(folder, "validation")] == entries
    assert all(len(e["conversations"]) <= 2 * 3 for e in entries)
    assert mrshapes.read_conversations(tmp_path / "conversations/mrshapes_test.json") == []
    assert sorted(tfds.builder_from_directory(str(folder)).info.splits) == ["train", "validation"]
    assert cli.main(argv[:4] + ["99"] + argv[5:]) == 2  # another seed: refused before any JSON is replaced
    assert mrshapes.read_conversations(tmp_path / "conversations/mrshapes_val.json") == entries


# ---------------------------------------------------------------------------------------------
# ref_coco


def test_ref_coco_pairs_become_single_round_conversations(ref_coco, caplog):
    with caplog.at_level(logging.WARNING):
        table = open_conversations(ref_coco, "train")
    assert isinstance(table, RefCocoConversations) and table.name == "ref_coco/refcoco_unc/1.1.0:train"
    assert len(table) == len(REF_IDS) == REF_PAIRS
    (reason,) = table.skipped  # record 102, whose mask is not a PNG
    assert reason.startswith(f"{table.name}[") and "UnidentifiedImageError" in reason and reason in caplog.text
    records = list(table)
    assert {r.entry["id"] for r in records} == REF_IDS.keys()
    for record in records:
        image_id, j, raw = REF_IDS[record.entry["id"]]
        image, obj = f"ref_coco/{image_id}", 10 * image_id + j
        assert record.entry["conversations"] == [
            {"from": "human", "value": f"[IMAGE256:{image}] {raw}"},
            {"from": "gpt", "value": f"[MASK-DECODE:{image}|ref_coco|{obj}]"}]
        (round_,) = parse_conversation(record.entry).rounds
        assert round_.question == raw and round_.target.target_id == str(obj)
        shape = REF_RECORDS[image_id][0][j][0]
        np.testing.assert_array_equal(record.mask(str(obj)), _ref_object_mask(_ref_scene(image_id), shape))
    assert open_conversations(ref_coco, "train", limit=2).index.tolist() == table.index[:2].tolist()


def test_ref_coco_in_the_pipeline_skips_bad_conversations_and_counts_them(shapes, ref_coco, caplog):
    tokenizer = shapes[2]
    with caplog.at_level(logging.WARNING, logger=p.__name__):
        iterator = iter(_pipeline(tokenizer, _config(p.ConversationFile(str(ref_coco), tfds_split="train")),
                                  num_epochs=3))
        examples = _examples(list(iterator))
    # every epoch draws all 6 pairs: the one of the undecodable image and the one with an empty mask fail
    assert iterator.skipped >= 6 and caplog.text.count("skipped conversation") == iterator.skipped
    bad_image = next(k for k, r in enumerate(open_conversations(ref_coco, "train")) if "_103_" in r.entry["id"])
    assert f"ref_coco/refcoco_unc/1.1.0:train[{bad_image}]: InputError: the {len(BAD_IMAGE)}-byte image" \
        in caplog.text
    assert "InputError: target mask '1040' of ref_coco is empty" in caplog.text
    assert len(examples) == 2 * 3 * 3  # failed draws were replaced from the same dataset
    assert {e.conv_id for e in examples} == {c for c, (i, j, _) in REF_IDS.items() if i == 101 or j == 1}
    for example in examples:
        image_id, j, _ = REF_IDS[example.conv_id]
        shape = REF_RECORDS[image_id][0][j][0]
        target = hipie_mask(_ref_scene(image_id).mask(shape), FRAME) > 0
        np.testing.assert_array_equal(example.target_masks[0], target)
        assert example.seg_positions.shape == (1,) and example.ref_rounds.size == 0


# ---------------------------------------------------------------------------------------------
# mixtures


def test_a_mixture_names_json_and_tfds_files_one_file_per_batch(shapes, ref_coco):
    root, folder, tokenizer = shapes
    config = _config(p.ConversationFile("mrshapes_train.json"),
                     p.ConversationFile(str(folder), tfds_split="validation"),
                     p.ConversationFile(str(ref_coco), tfds_split="train"), root=root)
    pipeline = _pipeline(tokenizer, config, batch_size=1, num_epochs=3)
    source = pipeline.loader.source
    assert source.file_lengths == (SIZES["train"], SIZES["val"], REF_PAIRS)
    prefixes = ("mrshapes_train_", "mrshapes_val_", "ref_coco_")
    batches = list(pipeline)
    assert {b["file_index"] for b in batches} == {0, 1, 2}
    for batch in batches:
        assert all(e.conv_id.startswith(prefixes[batch["file_index"]]) for e in batch["examples"])
    clone = pickle.loads(pickle.dumps(source))  # what a grain worker gets: the index, not the records
    assert clone._entries is None and all(table._source is None for table in clone._tables.values())
    assert clone._tables[2].index.tolist() == source._tables[2].index.tolist()
    for file_index in (1, 2):
        assert clone.entry(file_index, 1).entry == source.entry(file_index, 1).entry
    assert "ref_coco/refcoco_unc/1.1.0:train:6" in repr(source)


def test_the_original_yaml_can_name_a_tfds_split(tmp_path):
    (tmp_path / "conv.yaml").write_text("datasets:\n  - name: mr_refcoco_train.json\n"
                                        "  - name: tfds/ref_coco/refcoco_unc/1.1.0\n    tfds_split: train\n")
    (tmp_path / "anno.yaml").write_text("datasets:\n  - name: refcoco\n    path: refcoco/instances.json\n")
    config = p.MixtureConfig.from_yaml(tmp_path / "conv.yaml", tmp_path / "anno.yaml", images_root="i",
                                       annotations_root="a")
    assert config.conversations == (p.ConversationFile("mr_refcoco_train.json"),
                                    p.ConversationFile("tfds/ref_coco/refcoco_unc/1.1.0", tfds_split="train"))


# ---------------------------------------------------------------------------------------------
# no TensorFlow


_WITHOUT_TF = """
import sys
from segllm_jax.data.tfds_sources import open_conversations, write_mrshapes
folder = write_mrshapes(sys.argv[1], {"train": 1, "val": 1}, 0)
table = open_conversations(folder, "validation")
print(len(table), sorted(table[0].masks), table[0].entry["id"])
table = open_conversations(sys.argv[2], "train")
print(len(table), len(table.skipped), min(record.entry["id"] for record in table))
assert "tensorflow" not in sys.modules  # with TF absent, touching it raises; with TF installed, it loads
"""


def test_writing_and_reading_need_no_tensorflow(ref_coco, tmp_path):
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TF, str(tmp_path), str(ref_coco)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    val = mrshapes.scene_record(0, "val", 0)
    assert done.stdout.splitlines()[-2:] == [f"1 {sorted(val.masks)} {val.entry['id']}",
                                             f"{REF_PAIRS} 1 {min(REF_IDS)}"]
