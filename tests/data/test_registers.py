"""Annotation registers (architecture.md §E1) on tiny synthetic files, corrupt ones included, image path fix-ups."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segllm_jax.data import mrshapes
from segllm_jax.data import registers as r
from segllm_jax.errors import ConfigError, InputError

H, W = 6, 8


def _box_mask(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _registry(tmp_path: Path, *specs: r.RegisterSpec) -> r.AnnotationRegistry:
    return r.AnnotationRegistry(specs, tmp_path)


# ---------------------------------------------------------------------------------------------
# COCO-style json


@pytest.fixture
def coco(tmp_path) -> r.AnnotationRegistry:
    compressed = mask_utils.encode(np.asfortranarray(_box_mask(0, 2, 0, 3).astype(np.uint8)))
    data = {
        "images": [{"id": 1, "height": H, "width": W, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": mrshapes.rle_encode(_box_mask(1, 3, 2, 5))},
            {"id": 11, "image_id": 1, "segmentation": {"size": [H, W], "counts": compressed["counts"].decode()}},
            {"id": 12, "image_id": 1, "segmentation": [[2.0, 1.0, 6.0, 1.0, 6.0, 4.0, 2.0, 4.0]]},
            {"id": 13, "image_id": 1, "segmentation": {"size": [H, W], "counts": [1, 2]}},  # corrupt
            {"id": 14, "image_id": 1, "segmentation": [[1.0, 2.0]]},  # corrupt: one point
            {"id": 15, "image_id": 99, "segmentation": [[2.0, 1.0, 6.0, 1.0, 6.0, 4.0]]},  # no image
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return _registry(tmp_path, r.RegisterSpec("refcoco", "instances.json"))


def test_coco_rle_compressed_rle_and_polygon(coco):
    np.testing.assert_array_equal(coco.mask("refcoco", "10", "a.jpg", (H, W)), _box_mask(1, 3, 2, 5))
    np.testing.assert_array_equal(coco.mask("refcoco", "11", "a.jpg", (H, W)), _box_mask(0, 2, 0, 3))
    polygon = coco.mask("refcoco", "12", "a.jpg", (H, W))
    assert polygon.dtype == bool and polygon[2, 3] and not polygon[0, 0] and not polygon[5, 7]


@pytest.mark.parametrize("mask_id, message", [
    ("13", "cannot be decoded"), ("14", "cannot be decoded"), ("15", "height/width"),
    ("404", "not in"), ("abc", "not in"),
])
def test_coco_corrupt_or_missing_annotations(coco, mask_id, message):
    with pytest.raises(InputError, match=message):
        coco.mask("refcoco", mask_id, "a.jpg", (H, W))


def test_coco_size_mismatch_and_bad_file(coco, tmp_path):
    with pytest.raises(InputError, match="another image"):
        coco.mask("refcoco", "10", "a.jpg", (H + 1, W))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    registry = _registry(tmp_path, r.RegisterSpec("lvis", "broken.json"), r.RegisterSpec("paco_lvis", "list.json"),
                         r.RegisterSpec("refcocog", "absent.json"))
    for name, message in (("lvis", "not valid JSON"), ("paco_lvis", "COCO-style"), ("refcocog", "cannot be read")):
        with pytest.raises(InputError, match=message):
            registry.mask(name, "1", "a.jpg", (H, W))


def test_registers_pickle_without_their_data(coco):
    coco.mask("refcoco", "10", "a.jpg", (H, W))  # loads the json
    clone = pickle.loads(pickle.dumps(coco))
    assert clone._readers["refcoco"]._anns is None
    np.testing.assert_array_equal(clone.mask("refcoco", "10", "a.jpg", (H, W)), _box_mask(1, 3, 2, 5))


# ---------------------------------------------------------------------------------------------
# LabelMe (reason_seg)


def _labelme(path: Path, shapes: list, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps({"shapes": shapes, "is_sentence": True}, ensure_ascii=False).encode(encoding))


def test_labelme_polygons_skip_flag_and_ignore(tmp_path):
    square = [[1, 1], [3, 1], [3, 2], [1, 2]]
    _labelme(tmp_path / "rs/train/img1.json", [
        {"label": "target", "points": square},
        {"label": "target", "points": [[5.9, 3.2], [7, 3.2], [7, 5], [5.9, 5]]},  # truncated to ints
        {"label": "flag", "points": [[0, 5], [1, 5], [1, 5]]},
        {"label": "Ignore", "points": [[0, 4], [1, 4], [1, 5]]},
    ], encoding="cp1252")  # the original's fallback encoding
    registry = _registry(tmp_path, r.RegisterSpec("reason_seg", "rs/train", path_eval="rs/val"))
    mask = registry.mask("reason_seg", "", "reason_seg/images/img1.jpg", (H, W))
    expected = _box_mask(1, 3, 1, 4)
    expected[3:6, 5:8] = True
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(InputError, match="cannot be read"):  # eval reads rs/val, which has no file
        registry.mask("reason_seg", "", "reason_seg/images/img1.jpg", (H, W), is_eval=True)


@pytest.mark.parametrize("content, message", [
    ({"shapes": [{"label": "t", "points": [[1, "x"]]}]}, "non-numeric"),
    ({"shapes": [{"label": "t", "points": [[1, 1]]}]}, "at least two"),
    ({"nothing": []}, "shapes"),
])
def test_labelme_corrupt(tmp_path, content, message):
    (tmp_path / "img.json").write_text(json.dumps(content))
    registry = _registry(tmp_path, r.RegisterSpec("reason_seg", "."))
    with pytest.raises(InputError, match=message):
        registry.mask("reason_seg", "", "img.jpg", (H, W))


# ---------------------------------------------------------------------------------------------
# class-id PNGs


def test_ade20k_shifts_class_ids(tmp_path):
    labels = np.zeros((H, W), np.uint8)
    labels[0, :] = 1  # class 0 after the shift
    labels[1, :] = 2  # class 1
    labels[2, :] = 255  # stays "ignore" (255)
    (tmp_path / "ade").mkdir()
    Image.fromarray(labels).save(tmp_path / "ade/ADE_train_1.png")
    registry = _registry(tmp_path, r.RegisterSpec("ade20k", "ade"))
    get = lambda k: registry.mask("ade20k", k, "ade20k/images/ADE_train_1.jpg", (H, W))  # noqa: E731
    np.testing.assert_array_equal(get("0"), labels == 1)
    np.testing.assert_array_equal(get("1"), labels == 2)
    np.testing.assert_array_equal(get("255"), (labels == 0) | (labels == 255))
    with pytest.raises(InputError, match="integer class id"):
        get("wall")


def test_cocostuff_and_corrupt_pngs(tmp_path):
    labels = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 4
    Image.fromarray(labels).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "x.png").read_bytes()[:40])
    registry = _registry(tmp_path, r.RegisterSpec("cocostuff", "."))
    np.testing.assert_array_equal(registry.mask("cocostuff", "3", "coco/x.jpg", (H, W)), labels == 3)
    for name, message in (("rgb", "single-channel"), ("trunc", "cannot be decoded"), ("absent", "does not exist")):
        with pytest.raises(InputError, match=message):
            registry.mask("cocostuff", "3", f"{name}.jpg", (H, W))
    with pytest.raises(InputError, match="another image"):
        registry.mask("cocostuff", "3", "x.jpg", (W, H))


# ---------------------------------------------------------------------------------------------
# id -> RLE json


def test_json_register_rle_and_description_form(tmp_path):
    data = {
        "vg_1": mrshapes.rle_encode(_box_mask(0, 3, 0, 2)),
        "vg_2": {"segmentation": [[0.0, 0.0, 4.0, 0.0, 4.0, 3.0, 0.0, 3.0]], "image_dim": [H, W]},
        "vg_3": {"size": [H, W], "counts": [5, 5]},  # corrupt: counts do not cover the image
        "vg_4": {"counts": [48]},  # no size
    }
    (tmp_path / "vg.json").write_text(json.dumps(data))
    registry = _registry(tmp_path, r.RegisterSpec("visual_genome", "vg.json"),
                         r.RegisterSpec("description_based_coco", "vg.json"))
    np.testing.assert_array_equal(registry.mask("visual_genome", "vg_1", "x.jpg", (H, W)), _box_mask(0, 3, 0, 2))
    described = registry.mask("description_based_coco", "vg_2", "x.jpg", (H, W))
    assert described[1, 1] and not described[5, 7]
    for mask_id, message in (("vg_3", "cannot be decoded"), ("vg_4", "height, width"), ("vg_9", "not in")):
        with pytest.raises(InputError, match=message):
            registry.mask("visual_genome", mask_id, "x.jpg", (H, W))


def test_mrshapes_register_round_trips_through_the_json_reader(tmp_path):
    files = mrshapes.write_split(tmp_path, "val", 3, seed=11)
    registry = r.AnnotationRegistry([r.RegisterSpec("mrshapes", files.register.name)], files.register.parent)
    for index in range(3):
        scene, _ = mrshapes.scene_and_conversation(11, "val", index)
        image = f"mrshapes/val/{index:06d}.png"
        assert r.resolve_image_path(files.images_root, image) == files.images_root / image
        for i in range(len(scene.shapes)):
            mask = registry.mask("mrshapes", f"val_{index:06d}_{i}", image, scene.image.shape[:2])
            np.testing.assert_array_equal(mask, scene.mask(i))


# ---------------------------------------------------------------------------------------------
# registry and config


def test_registry_names_kinds_and_errors(tmp_path):
    assert r.RegisterSpec("reason_seg", "p").resolved_kind == "labelme"
    assert r.RegisterSpec("pascal", "p").resolved_kind == "json"
    assert r.RegisterSpec("refcoco+", "p").resolved_kind == "coco"
    assert r.RegisterSpec("custom", "p", kind="ade20k").resolved_kind == "ade20k"
    with pytest.raises(ConfigError):
        _ = r.RegisterSpec("custom", "p", kind="nope").resolved_kind
    registry = _registry(tmp_path, r.RegisterSpec("paco_lvis", "train.json", path_eval="val.json"))
    assert registry.names == ("paco_lvis", "paco_lvis_eval")
    with pytest.raises(InputError, match="no annotation register"):
        registry.mask("lvis", "1", "x.jpg", (H, W))


def test_read_register_specs_from_original_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "datasets:\n  - name: refcoco\n    path: refcoco/instances.json\n"
        "  - name: reason_seg\n    path: reason_seg/annotations/train\n    path_eval: reason_seg/annotations/val\n")
    assert r.read_register_specs(tmp_path / "a.yaml") == [
        r.RegisterSpec("refcoco", "refcoco/instances.json"),
        r.RegisterSpec("reason_seg", "reason_seg/annotations/train", "reason_seg/annotations/val")]
    (tmp_path / "b.yaml").write_text("datasets:\n  - path: x\n")
    with pytest.raises(ConfigError):
        r.read_register_specs(tmp_path / "b.yaml")


# ---------------------------------------------------------------------------------------------
# image paths


@pytest.mark.parametrize("given, stored", [
    ("coco/train2014/COCO_train2014_1.jpg", "coco/train2014/COCO_train2014_1.jpg"),
    ("coco/val2014/COCO_val2014_1.jpg", "coco/train2014/COCO_train2014_1.jpg"),
    ("coco/new_train2014/x.jpg", "coco/train2014/x.jpg"),
    ("VG_100K/1.jpg", "vg/VG_100K/1.jpg"),
    ("./VG_100K_2/2.jpg", "vg/VG_100K_2/2.jpg"),
    ("lvis/val2017/3.jpg", "lvis/train2017/3.jpg"),
    ("images/4.jpg", "object365/4.jpg"),
])
def test_image_path_fixups(tmp_path, given, stored):
    (tmp_path / stored).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / stored).write_bytes(b"")
    assert r.resolve_image_path(tmp_path, given) == tmp_path / stored


def test_missing_image_path(tmp_path):
    with pytest.raises(InputError, match="missing"):
        r.resolve_image_path(tmp_path, "coco/train2014/absent.jpg")
