"""MR-Shapes scenes written as a COCO instances file: the small annotated data set the COCO-conversation and
fine-tuning tests make themselves.

Every segmentation form COCO files use appears: polygons (the shapes with corners, unoccluded, as an
annotator would draw them), uncompressed RLE and compressed RLE (the round shapes' visible masks).
``add_problems`` then appends one example of every kind of bad annotation ``make-conversations``
must report and skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from segllm_jax.data import mrshapes
from segllm_jax.data.registers import segmentation_to_mask
from segllm_jax.data.rle import rle_encode, rle_encode_compressed

CATEGORIES = [{"id": k + 1, "name": kind, "supercategory": "shape"} for k, kind in enumerate(mrshapes.KINDS)]
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _segmentation(scene: mrshapes.Scene, i: int, polygons: bool) -> Any:
    """A polygon of the unoccluded shape when it has corners (and ``polygons``), else RLE of the visible mask."""
    vertices = scene.shapes[i].polygon()
    if polygons and vertices is not None:
        return [[round(float(v), 2) for v in vertices.ravel()]]
    return rle_encode(scene.mask(i)) if i % 2 else rle_encode_compressed(scene.mask(i))


def write_coco(root: Path, split: str, n: int, seed: int = 0, polygons: bool = True) -> tuple[Path, Path]:
    """``n`` MR-Shapes scenes of ``split`` as ``root/images/<split>_<i>.png`` + ``root/<split>.json`` (COCO)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(n):
        scene, _ = mrshapes.scene_and_conversation(seed, split, index, 3)
        record = mrshapes.scene_record(seed, split, index, 3)
        name = f"{split}_{index:03d}.png"
        (images_dir / name).write_bytes(record.png)
        image_id = 1000 * (mrshapes.SPLITS.index(split) + 1) + index
        height, width = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for i, shape in enumerate(scene.shapes):
            annotations.append({"id": image_id * 100 + i, "image_id": image_id, "category_id": CATEGORY_ID[shape.kind],
                                "iscrowd": 0, "segmentation": _segmentation(scene, i, polygons),
                                "bbox": _bbox(scene.mask(i)), "area": int(scene.areas[i])})
    path = root / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path, images_dir


def annotation_mask(coco: dict[str, Any], ann_id: int) -> np.ndarray:
    """The mask of annotation ``ann_id``, decoded from the file alone (for the register check)."""
    ann = next(a for a in coco["annotations"] if a["id"] == ann_id)
    image = next(img for img in coco["images"] if img["id"] == ann["image_id"])
    return segmentation_to_mask(ann["segmentation"], image["height"], image["width"])


def add_problems(path: Path, images_dir: Path) -> dict[str, Any]:
    """One of every bad annotation, on copies of the first scene's image; returns what each problem hit.

    * ``missing``: an image record whose file does not exist;
    * ``empty``: an image with no annotations;
    * ``bad``: an image whose annotations are a crowd region, a 4-number "polygon" (pycocotools would read it
      as a box), a zero-area polygon, an unknown category and an undecodable RLE (all with boxes), plus
      one good annotation per shape of the scene;
    * ``lost``: an image with an unusable annotation that has no box either (the image is skipped);
    * ``twice``: two image records with one id (both skipped: whose annotations are whose is unknown);
    * an annotation of an image id the file does not list, and a ref to an annotation that does not exist.
    """
    coco = json.loads(path.read_text())
    first = coco["images"][0]
    height, width = first["height"], first["width"]
    source = (images_dir / first["file_name"]).read_bytes()
    next_image = max(img["id"] for img in coco["images"]) + 1
    ids = {}
    for key in ("missing", "empty", "bad", "lost"):
        ids[key] = next_image
        record = dict(first, id=next_image, file_name=f"problem_{key}.png")
        coco["images"].append(record)
        if key != "missing":
            (images_dir / record["file_name"]).write_bytes(source)
        next_image += 1
    ids["twice"] = next_image
    coco["images"] += [dict(first, id=next_image), dict(first, id=next_image, file_name="problem_empty.png")]
    good = [dict(a, id=a["id"] + 500_000, image_id=ids["bad"]) for a in coco["annotations"]
            if a["image_id"] == first["id"]]
    box = [5, 5, 20, 20]
    bad = {
        "crowd": {"iscrowd": 1, "segmentation": rle_encode(np.pad(np.ones((10, 10), bool),
                                                                  ((0, height - 10), (0, width - 10))))},
        "four_numbers": {"segmentation": [[5.0, 5.0, 20.0, 20.0]]},
        "zero_area": {"segmentation": [[5.0, 5.0, 10.0, 10.0, 15.0, 15.0]]},
        "unknown_category": {"category_id": 999, "segmentation": [[5.0, 5.0, 25.0, 5.0, 25.0, 25.0]]},
        "undecodable": {"segmentation": {"size": [height, width], "counts": [3, 4]}},
    }
    for k, (name, fields) in enumerate(bad.items()):
        ids[name] = 900_000 + k
        coco["annotations"].append({"id": ids[name], "image_id": ids["bad"], "category_id": 1, "iscrowd": 0,
                                    "bbox": box, **fields})
    ids["no_box"] = 900_100
    coco["annotations"] += good + [
        {"id": ids["no_box"], "image_id": ids["lost"], "category_id": 999, "segmentation": [[1, 2, 3, 4]]},
        {"id": 900_200, "image_id": 123_456_789, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]},
    ] + [dict(a, id=a["id"] + 600_000, image_id=ids["lost"]) for a in good] + \
        [dict(a, id=a["id"] + 700_000, image_id=ids["twice"]) for a in good]
    coco["refs"] = [{"ann_id": 77_777_777, "sentences": [{"sent": "nothing"}]}]
    path.write_text(json.dumps(coco))
    ids["good_in_bad"] = [a["id"] for a in good]
    return ids
