"""MR-Shapes: determinism, exact masks, reference-only-answerable rounds, JSON/RLE round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segllm_jax.data import mrshapes as m
from segllm_jax.errors import InputError

SEED = 7
N_SCENES = 24  # in-memory scenes for the property tests


@pytest.fixture(scope="module")
def scenes() -> list[tuple[m.Scene, m.Conversation]]:
    return [m.scene_and_conversation(SEED, "train", i) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, m.SplitFiles]:
    out = tmp_path_factory.mktemp("mrshapes")
    return out, m.write_split(out, "val", 6, SEED)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_bytes(written, tmp_path):
    out, _ = written
    m.write_split(tmp_path, "val", 6, SEED)
    assert _tree_bytes(tmp_path) == _tree_bytes(out)


def test_different_seed_or_split_gives_different_data(written, tmp_path):
    out, files = written
    other = m.write_split(tmp_path / "seed", "val", 6, SEED + 1)
    assert other.conversations.read_bytes() != files.conversations.read_bytes()
    first_png = "mrshapes/val/000000.png"
    assert (other.images_root / first_png).read_bytes() != (files.images_root / first_png).read_bytes()
    test_split = m.write_split(tmp_path / "split", "test", 6, SEED)
    assert (test_split.images_root / "mrshapes/test/000000.png").read_bytes() != \
        (files.images_root / first_png).read_bytes()


def test_split_of_n_is_prefix_of_split_of_more(written, tmp_path):
    _, files = written
    small = m.write_split(tmp_path, "val", 2, SEED)
    assert m.read_conversations(small.conversations) == m.read_conversations(files.conversations)[:2]


# ---------------------------------------------------------------------------------------------
# scenes and masks


def test_palette_and_kinds():
    assert len(m.KINDS) >= 5 and len(m.PALETTE) >= 6
    assert len(set(m.PALETTE.values())) == len(m.PALETTE)
    for rgb in m.PALETTE.values():  # a shape colour can never be a background pixel
        assert any(not m._BG_LOW <= c <= m._BG_HIGH for c in rgb)


def test_scene_sizes_and_counts(scenes):
    for scene, _ in scenes:
        h, w, c = scene.image.shape
        assert c == 3 and scene.image.dtype == np.uint8
        assert m.MIN_SIZE <= h <= m.MAX_SIZE and m.MIN_SIZE <= w <= m.MAX_SIZE
        assert 3 <= len(scene.shapes) <= 8
    kinds = {s.kind for scene, _ in scenes for s in scene.shapes}
    assert len(kinds) >= 5


def test_masks_are_exactly_the_visible_painted_pixels(scenes):
    for scene, _ in scenes:
        h, w = scene.instance_map.shape
        masks = np.stack([scene.mask(i) for i in range(len(scene.shapes))])
        assert masks.any(axis=(1, 2)).all(), "every instance is visible"
        assert masks.sum(0).max() <= 1, "masks of one scene are disjoint"
        # occlusion by draw order: visible = own geometry minus everything drawn later
        rasters = np.stack([s.raster(h, w) for s in scene.shapes])
        for i in range(len(scene.shapes)):
            later = rasters[i + 1:].any(0) if i + 1 < len(rasters) else np.zeros((h, w), bool)
            np.testing.assert_array_equal(masks[i], rasters[i] & ~later)
            assert masks[i].sum() >= 0.6 * rasters[i].sum()
        # the image agrees with the masks: pixels of a colour are exactly its instances' masks
        for name in {s.color for s in scene.shapes}:
            painted = np.all(scene.image == np.array(m.PALETTE[name], np.uint8), axis=-1)
            union = masks[[i for i, s in enumerate(scene.shapes) if s.color == name]].any(0)
            np.testing.assert_array_equal(painted, union)


def test_same_colour_shapes_never_touch(scenes):
    for scene, _ in scenes:
        colors = np.array([s.color for s in scene.shapes])
        assert not (scene.adjacency & (colors[:, None] == colors[None, :])).any()


def test_register_masks_match_scenes(written):
    _, files = written
    register = m.read_register(files.register)
    for index in range(6):
        scene, _ = m.scene_and_conversation(SEED, "val", index)
        png = np.asarray(Image.open(files.images_root / f"mrshapes/val/{index:06d}.png"))
        np.testing.assert_array_equal(png, scene.image)
        for i in range(len(scene.shapes)):
            np.testing.assert_array_equal(m.load_mask(register, f"val_{index:06d}_{i}"), scene.mask(i))
    np.testing.assert_array_equal(m.load_mask(files.register, "val_000005_0"), scene.mask(0))  # path form
    with pytest.raises(InputError):
        m.load_mask(register, "val_999999_0")


# ---------------------------------------------------------------------------------------------
# conversations


def test_rounds_are_unique_and_reference_dependent(scenes):
    lengths = []
    for scene, conv in scenes:
        lengths.append(len(conv.rounds))
        assert 2 <= len(conv.rounds) <= 6
        first = conv.rounds[0]
        assert first.ref_round is None and first.query.relation == "direct"
        assert m.resolve(scene, first.query) == first.target
        targets = [r.target for r in conv.rounds]
        assert len(set(targets)) == len(targets), "each round asks for a new instance"
        for k, r in enumerate(conv.rounds[1:], start=1):
            assert r.ref_round is not None and 0 <= r.ref_round < k
            ref = conv.reference_instance(k)
            assert m.resolve(scene, r.query, ref) == r.target
            answers = m.answers_by_reference(scene, r.query)
            assert any(a is not None and a != r.target for a in answers.values()), \
                "another reference would give another answer: the text alone is ambiguous"
            assert m.depends_on_reference(scene, r.query, ref)
            assert f"instance {r.ref_round + 1}" in r.question
            assert r.tagged_question.endswith(f"[REF:{r.ref_round + 1}]")
    assert max(lengths) >= 4


def test_relations_agree_with_brute_force(scenes):
    """Independent checks of what two relations mean, not via ``resolve``."""
    seen = set()
    for scene, conv in scenes:
        for k, r in enumerate(conv.rounds[1:], start=1):
            ref = conv.reference_instance(k)
            q = r.query
            ok = [i for i, s in enumerate(scene.shapes) if i != ref
                  and (q.kind is None or s.kind == q.kind) and (q.color is None or s.color == q.color)]
            if q.relation == "same_color":
                assert [i for i in ok if scene.shapes[i].color == scene.shapes[ref].color] == [r.target]
            elif q.relation == "nearest":
                d = {i: np.hypot(*np.subtract(scene.shapes[i].center, scene.shapes[ref].center)) for i in ok}
                assert min(d, key=d.get) == r.target
                assert all(d[i] >= 1.25 * d[r.target] for i in ok if i != r.target)
            seen.add(q.relation)
    assert {"same_color", "nearest"} <= seen


def _hand_scene(*shapes: m.Shape, size: int = 200) -> m.Scene:
    """A scene painted from given shapes (draw order = index), bypassing the sampler."""
    instance_map = np.full((size, size), -1, np.int16)
    for i, shape in enumerate(shapes):
        instance_map[shape.raster(size, size)] = i
    image = np.full((size, size, 3), 128, np.uint8)
    return m.Scene(image=image, instance_map=instance_map, shapes=tuple(shapes))


def _circle(x: float, y: float, color: str = "red", r: float = 8.0, kind: str = "circle") -> m.Shape:
    return m.Shape(kind=kind, color=color, center=(x, y), radius=r, angle=0.0)


def test_hand_built_scene_answers():
    #   0 red circle (100,100)   1 blue circle (60,100)   2 red square (160,100, big)   3 blue star (100,40)
    scene = _hand_scene(_circle(100, 100), _circle(60, 100, "blue"), _circle(160, 100, r=20, kind="square"),
                        _circle(100, 40, "blue", kind="star"))
    q = m.Query
    assert m.resolve(scene, q("direct", kind="square")) == 2
    assert m.resolve(scene, q("direct", color="red", kind="circle")) == 0
    assert m.resolve(scene, q("direct", color="red")) is None  # two red shapes
    assert m.resolve(scene, q("direct", kind="square", extreme="largest")) is None  # needs 2 squares
    assert m.resolve(scene, q("direct", extreme="largest")) == 2
    assert m.resolve(scene, q("direct", extreme="topmost")) == 3
    assert m.resolve(scene, q("nearest"), ref=0) == 1  # 40 px vs 60 and 60
    assert m.resolve(scene, q("left_of"), ref=0) == 1
    assert m.resolve(scene, q("right_of"), ref=0) == 2
    assert m.resolve(scene, q("above"), ref=0) == 3
    assert m.resolve(scene, q("below"), ref=0) is None
    assert m.resolve(scene, q("same_color"), ref=0) == 2
    assert m.resolve(scene, q("same_color"), ref=1) == 3
    assert m.resolve(scene, q("farthest"), ref=1) == 2  # 100 px vs 40 and 72
    # reference dependence: "same color" has different answers for different references ...
    assert m.depends_on_reference(scene, q("same_color"), 0)
    # ... but "the nearest square to X" is the only square whatever X is: not emitted
    assert not m.depends_on_reference(scene, q("nearest", kind="square"), 0)
    with pytest.raises(ValueError):
        m.resolve(scene, q("nearest"))  # a referring relation needs a reference


def test_margins_reject_near_ties():
    # refs at 100; candidates at 40 and 45 px: nearest is not clear enough for a person
    scene = _hand_scene(_circle(100, 100), _circle(140, 100, "blue"), _circle(100, 145, "green"))
    assert m.resolve(scene, m.Query("nearest"), ref=0) is None
    # a shape on the 45° diagonal is ambiguous for "left of" and blocks a farther in-cone answer
    scene = _hand_scene(_circle(100, 100), _circle(70, 70, "blue"), _circle(50, 100, "green"))
    assert m.resolve(scene, m.Query("left_of"), ref=0) is None


def test_touching_uses_visible_contact():
    scene = _hand_scene(_circle(100, 100, r=20), _circle(125, 100, "blue", r=12), _circle(40, 40, "green"))
    assert scene.adjacency[0, 1] and not scene.adjacency[0, 2]
    assert m.resolve(scene, m.Query("touching"), ref=0) == 1
    assert m.resolve(scene, m.Query("touching"), ref=2) is None


def test_json_round_trip_and_placeholders(written):
    _, files = written
    entries = m.read_conversations(files.conversations)
    assert len(entries) == 6
    register = m.read_register(files.register)
    for index, entry in enumerate(entries):
        scene, conv = m.scene_and_conversation(SEED, "val", index)
        image = f"mrshapes/val/{index:06d}.png"
        ids = [f"val_{index:06d}_{i}" for i in range(len(scene.shapes))]
        assert entry == m.conversation_to_json(conv, image, ids, f"mrshapes_val_{index:06d}")
        assert entry["task"] == "segmentation"
        turns = entry["conversations"]
        assert len(turns) == 2 * len(conv.rounds)
        for k, r in enumerate(conv.rounds):
            human, text = m.parse_placeholders(turns[2 * k]["value"])
            gpt, rest = m.parse_placeholders(turns[2 * k + 1]["value"])
            assert text == r.question and rest == ""
            assert [p.kind for p in gpt] == ["MASK-DECODE"]
            decode = m.parse_decode(gpt[0].payload)
            assert (decode.image, decode.dataset, decode.target_id) == (image, "mrshapes", ids[r.target])
            assert decode.target_id in register
            if k == 0:
                assert [p.kind for p in human] == ["IMAGE256"] and human[0].payload == image
                assert turns[0]["value"].startswith(f"[IMAGE256:{image}] ")
                assert decode.ref_ids == () and decode.task_type is None
            else:
                assert [p.kind for p in human] == ["MASK-ENCODE", "BOX-ENCODE"]
                ref_id = ids[conv.reference_instance(k)]
                for p in human:
                    assert m.parse_mask_ref(p.payload) == m.MaskRef(image, "mrshapes", ref_id)
                assert decode.ref_ids == (ref_id,) and decode.task_type == r.query.relation


def test_parse_decode_forms_and_errors():
    assert m.parse_decode("a.png|ds|5") == m.DecodeTarget("a.png", "ds", "5")
    assert m.parse_decode("t:1:2:a.png:ds") == m.DecodeTarget("a.png", "ds", "2", ("1",), "t")
    assert m.parse_decode("t:1:9:2:a.png:ds") == m.DecodeTarget("a.png", "ds", "2", ("1", "9"), "t")
    for bad in ("a.png|ds", "t:1:a.png:ds", ""):
        with pytest.raises(InputError):
            m.parse_decode(bad)
    found, text = m.parse_placeholders("[REF:1][IMAGE256:x.png] hi [other]")
    assert [p.kind for p in found] == ["IMAGE256"] and text == "[REF:1] hi [other]"


def test_read_conversations_rejects_bad_turns(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x", "conversations": [{"from": "gpt", "value": "a"}]}]')
    with pytest.raises(InputError):
        m.read_conversations(bad)


# ---------------------------------------------------------------------------------------------
# RLE


def test_rle_hand_computed_column_major():
    mask = np.array([[0, 1], [1, 1]], bool)  # column-major: 0,1 | 1,1
    assert m.rle_encode(mask) == {"size": [2, 2], "counts": [1, 3]}
    assert m.rle_encode(np.array([[1, 0, 0]], bool)) == {"size": [1, 3], "counts": [0, 1, 2]}


@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (3, 1)])
def test_rle_round_trip_empty_full_random(shape):
    rng = np.random.default_rng(1)
    for mask in (np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.5):
        rle = m.rle_encode(mask)
        assert sum(rle["counts"]) == mask.size
        np.testing.assert_array_equal(m.rle_decode(rle), mask)
    assert m.rle_encode(np.zeros(shape, bool))["counts"] == [mask.size]
    assert m.rle_encode(np.ones(shape, bool))["counts"] == [0, mask.size]
    zero = m.rle_encode(np.zeros((0, 4), bool))
    assert m.rle_decode(zero).shape == (0, 4)


def test_rle_rejects_corrupt_counts():
    with pytest.raises(InputError):
        m.rle_decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(InputError):
        m.rle_decode({"size": [2, 2], "counts": "compressed"})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2
def test_rle_matches_pycocotools_if_installed():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(2)
    mask = rng.random((13, 9)) < 0.3
    rle = m.rle_encode(mask)
    coco = mask_utils.frPyObjects(rle, *rle["size"])
    np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), mask)
    np.testing.assert_array_equal(m.rle_decode(rle), mask)
