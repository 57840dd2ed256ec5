"""``make-conversations``: conversations from COCO-format annotations are answerable (unique, reference-
dependent, checked again here against the layout), name the right masks in the register, come out the same
for the same seed, and bad annotations are reported per image and skipped without a crash.

The data are MR-Shapes scenes written as a COCO file (``coco_fixture.py``): polygons, uncompressed and
compressed RLE, categories = shape kinds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segllm_jax.apps import cli
from segllm_jax.data import mrshapes
from segllm_jax.data.coco import CocoLayout, Instance, read_coco
from segllm_jax.data.coco_conversations import CocoOptions, image_conversations, mixture, write_conversations
from segllm_jax.data.conversations import parse_conversation
from segllm_jax.data.referring import EXPRESSION, depends_on_reference, resolve
from segllm_jax.data.registers import JsonMaskRegister
from segllm_jax.errors import InputError
from segllm_jax.eval.data_spec import EvalData

from .coco_fixture import add_problems, annotation_mask, write_coco

N_SCENES = 6


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """(COCO file, images folder, what add_problems made): 6 scenes plus one of every bad annotation."""
    root = tmp_path_factory.mktemp("coco")
    path, images = write_coco(root, "train", N_SCENES)
    return path, images, add_problems(path, images)


@pytest.fixture(scope="module")
def written(coco, tmp_path_factory):
    path, images, _ = coco
    out = tmp_path_factory.mktemp("made") / "conversations"
    assert cli.main(["make-conversations", "--coco", str(path), "--images", str(images), "--out", str(out),
                     "--rounds", "4", "--per-image", "3", "--seed", "5", "--quiet"]) == 0
    return out


def test_every_round_is_unique_reference_dependent_and_eligible(coco):
    path, images, problems = coco
    data = read_coco(path)
    options = CocoOptions(rounds=5, per_image=4, seed=1)
    checked = 0
    for position in range(len(data.images)):
        result = image_conversations(data, position, images, options)
        for conversation, entry in zip(result.conversations, result.entries, strict=True):
            layout = result.layout
            parsed = parse_conversation(entry)  # the pipeline's own parser accepts it
            for k, r in enumerate(conversation.rounds):
                assert layout.instances[r.target].eligible
                ref = conversation.reference_instance(k)
                if ref is None:
                    assert resolve(layout, r.query) == r.target
                else:
                    assert resolve(layout, r.query, ref) == r.target and depends_on_reference(layout, r.query, ref)
                    assert f"instance {r.ref_round + 1}" in r.question and r.query.relation != "same_color"
                    assert parsed.rounds[k].references[0].mask_id == str(layout.instances[ref].ann_id)
                assert parsed.rounds[k].target.target_id == str(layout.instances[r.target].ann_id)
                checked += 1
    bad_ids = {v for k, v in problems.items()
               if isinstance(v, int) and k not in ("missing", "empty", "bad", "lost", "twice")}
    assert checked > 40
    assert not bad_ids & {int(i) for r in [image_conversations(data, p, images, options) for p in
                                           range(len(data.images))] for i in r.masks}


def test_register_holds_the_annotated_masks_and_eval_reads_the_folder(coco, written):
    path, images, _ = coco
    data = json.loads(path.read_text())
    entries = json.loads((written / "conversations" / "coco_conversations.json").read_text())
    register = JsonMaskRegister(written / "annotations" / "coco_conversations.json")
    named = {r.target.target_id for e in entries for r in parse_conversation(e).rounds}
    for mask_id in named:
        want = annotation_mask(data, int(mask_id))
        np.testing.assert_array_equal(register.mask(mask_id, "", want.shape), want, err_msg=mask_id)
    spec = EvalData.parse(str(written / "data.json")).check()
    assert spec.images_root == str(images.absolute()) and spec.registers[0].kind == "json"
    mix = mixture(written)
    assert (Path(mix.conversations_root) / mix.conversations[0].path).is_file()
    assert {len(e["conversations"]) // 2 for e in entries} >= {1, 2}  # single- and multi-round


def test_bad_annotations_are_reported_per_image_and_skipped(coco, written, capsys):
    _, _, ids = coco
    report = json.loads((written / "report.json").read_text())
    assert report["skipped_images"] == {"duplicate_image_id": 2, "missing_image": 1, "no_instances": 1,
                                        "unlocatable_annotation": 1}
    assert report["skipped_annotations"] == {"crowd": 1, "degenerate_polygon": 2, "unknown_category": 2,
                                             "undecodable_segmentation": 1}
    assert report["file_problems"] == {"orphan_annotation": 1, "ref_unknown_annotation": 1}
    assert report["images"] == {"total": N_SCENES + 6, "used": N_SCENES + 1, "skipped": 5}
    per_image = {r["image_id"]: r for r in report["per_image"]}
    assert per_image[ids["missing"]]["skipped"]["kind"] == "missing_image"
    assert per_image[ids["lost"]]["skipped"]["annotation_id"] == ids["no_box"]
    bad = {p["annotation_id"]: p["kind"] for p in per_image[ids["bad"]]["problems"]}
    assert bad == {ids["crowd"]: "crowd", ids["four_numbers"]: "degenerate_polygon",
                   ids["zero_area"]: "degenerate_polygon", ids["unknown_category"]: "unknown_category",
                   ids["undecodable"]: "undecodable_segmentation"}
    text = (written / "conversations" / "coco_conversations.json").read_text()
    for name in ("crowd", "four_numbers", "zero_area", "unknown_category", "undecodable", "no_box"):
        assert f"|{ids[name]}]" not in text and f":{ids[name]}:" not in text, name
    assert any(str(i) in text for i in ids["good_in_bad"])  # the image's good annotations are still used


def test_an_unusable_annotation_still_competes():
    """Two circles, one of them a crowd region: "the circle" must not be asked, "the square" may."""
    square = np.zeros((40, 60), bool)
    square[5:15, 5:15] = True
    instances = (Instance(1, "circle", (30, 20, 40, 30), np.ones((10, 10), bool), True),
                 Instance(2, "circle", (45, 5, 55, 15), np.ones((10, 10), bool), False),
                 Instance(3, "square", (5, 5, 15, 15), np.ones((10, 10), bool), True))
    layout = CocoLayout(instances, (40, 60))
    from segllm_jax.data.referring import direct_options

    options = direct_options(layout, layout.eligible)
    assert all(q.kind != "circle" or q.extreme for q, _ in options) and any(q.kind == "square" for q, _ in options)
    assert 1 not in {t for _, t in options}  # the crowd circle is never an answer


def test_adjacency_from_masks_matches_the_scene():
    """Touching from the RLE masks (dilate-and-overlap on crops) equals MR-Shapes' instance-map contacts."""
    for index in range(4):
        scene, _ = mrshapes.scene_and_conversation(3, "val", index, 3)
        instances = []
        for i in range(len(scene.shapes)):
            mask = scene.mask(i)
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            instances.append(Instance(i, scene.shapes[i].kind, box, mask[box[1]:box[3], box[0]:box[2]], True))
        layout = CocoLayout(tuple(instances), scene.image_hw)
        np.testing.assert_array_equal(layout.adjacency, scene.adjacency)
        np.testing.assert_array_equal(layout.areas, scene.areas)


def test_refs_give_round_one_expressions(tmp_path):
    path, images = write_coco(tmp_path, "val", 2)
    data = json.loads(path.read_text())
    first = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    target = max(first, key=lambda a: a["area"])
    data["refs"] = [{"ann_id": target["id"], "sentences": [{"sent": "the big [one]  on the board"}]}]
    path.write_text(json.dumps(data))
    result = image_conversations(read_coco(path), 0, images, CocoOptions(rounds=2, expression_share=1.0))
    first_round = result.conversations[0].rounds[0]
    assert first_round.query.relation == EXPRESSION
    assert result.layout.instances[first_round.target].ann_id == target["id"]
    assert "the big one on the board" in result.entries[0]["conversations"][0]["value"]  # no stray brackets


def test_same_seed_same_bytes_other_seed_other_conversations(coco, tmp_path):
    path, images, _ = coco
    made = [write_conversations(path, images, tmp_path / name, CocoOptions(per_image=2, seed=seed), progress=False)
            for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    a, b, c = ((f.conversations.read_bytes(), f.register.read_bytes()) for f in made)
    assert a == b and a[0] != c[0]


def test_output_is_atomic_and_never_overwrites(coco, tmp_path, monkeypatch, capsys):
    path, images, _ = coco
    out = tmp_path / "out"
    args = ["make-conversations", "--coco", str(path), "--images", str(images), "--out", str(out), "--quiet"]
    import segllm_jax.data.coco_conversations as module

    real = module.register_text
    monkeypatch.setattr(module, "register_text", lambda r: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(args) == 130
    assert not out.exists() and not list(tmp_path.iterdir())  # no folder, no hidden leftovers
    monkeypatch.setattr(module, "register_text", real)
    assert cli.main(args) == 0
    before = (out / "conversations" / "coco_conversations.json").read_bytes()
    capsys.readouterr()
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite", "--seed", "9"]) == 0
    assert (out / "conversations" / "coco_conversations.json").read_bytes() != before


@pytest.mark.parametrize("case, fragment", [
    ("not coco", "not a COCO instances file"),
    ("no categories", "no 'categories' list"),
    ("nothing usable", "no conversation could be made"),
    ("bad name", "dataset name"),
])
def test_unusable_input_is_one_sentence(case, fragment, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    content = {"not coco": [], "no categories": {"images": [], "annotations": []},
               "nothing usable": {"images": [{"id": 1, "file_name": "gone.png", "height": 8, "width": 8}],
                                  "annotations": [], "categories": []}}.get(case, {})
    (tmp_path / "c.json").write_text(json.dumps(content))
    extra = ["--name", "a|b"] if case == "bad name" else []
    code = cli.main(["make-conversations", "--coco", str(tmp_path / "c.json"), "--images", str(images),
                     "--out", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_options_and_folders_are_checked(tmp_path):
    with pytest.raises(InputError, match="rounds >= 1"):
        CocoOptions(rounds=0)
    with pytest.raises(InputError, match="not a make-conversations folder"):
        mixture(tmp_path)  # what a training config says when SEGLLM_DATA is mistyped
