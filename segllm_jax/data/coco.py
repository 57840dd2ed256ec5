"""A COCO instances file, read and checked: its image records, and one image's annotations as located instances.

What ``segllm-jax make-conversations`` (:mod:`segllm_jax.data.coco_conversations`) asks its questions about. Nothing
here raises for bad data in an image or an annotation: each problem is a :class:`Problem` (a kind from the tables
below, in words for the printed summary) that the report counts; only a file that is not COCO-shaped at all is an
:class:`InputError`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from segllm_jax.data.registers import load_json, resolve_image_path, segmentation_to_mask
from segllm_jax.errors import InputError
from segllm_jax.preprocess import mask_box

PathLike = Union[str, os.PathLike]

# Why an image or an annotation was skipped (the report's keys), in words for the printed summary.
IMAGE_PROBLEMS = {
    "bad_image_record": "image records without a usable id, file_name, height or width",
    "duplicate_image_id": "image records sharing their id with another record",
    "unusable_file_name": "file names the conversation format cannot carry or the loader would rewrite",
    "missing_image": "image files missing under --images",
    "unreadable_image": "image files that are not readable pictures",
    "size_mismatch": "images whose file size differs from the record's height/width",
    "no_instances": "images with no usable instance",
    "unlocatable_annotation": "images with an annotation that has neither a mask nor a box",
    "no_unique_referent": "images where no instance can be named uniquely",
}
ANNOTATION_PROBLEMS = {
    "crowd": "crowd annotations",
    "unknown_category": "annotations whose category is absent from 'categories'",
    "degenerate_polygon": "degenerate polygons (fewer than 3 points, non-numeric, or zero area)",
    "undecodable_segmentation": "segmentations that cannot be decoded at the image's size",
    "no_mask": "annotations without a segmentation",
    "bad_annotation_record": "annotation records without a usable id or category_id",
}
FILE_PROBLEMS = {
    "orphan_annotation": "annotations of an image id the file does not list",
    "bad_ref": "refs without an ann_id or sentences",
    "ref_unknown_annotation": "refs naming an annotation id the file does not have",
}
_PAYLOAD_CHARS = re.compile(r"[\[\]|:]")  # would break a placeholder's payload (architecture.md §D1)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One reason something was skipped, for the report."""

    kind: str  # a key of IMAGE_PROBLEMS or ANNOTATION_PROBLEMS
    detail: str
    annotation_id: Any = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True, eq=False)
class CocoFile:
    """An instances file, indexed: what every image needs, and what was wrong with the file itself."""

    images: list[Any]  # the records as given (checked per image)
    annotations: dict[Any, list[dict[str, Any]]]  # image id -> its annotation records
    categories: dict[int, str]  # category id -> name as questions say it
    expressions: dict[int, list[str]]  # annotation id -> referring expressions (RefCOCO-style refs)
    file_problems: Counter
    duplicate_ids: frozenset[int]  # annotation ids used more than once: they cannot name a register mask
    duplicate_images: frozenset[int]  # image ids of several records: whose annotations are whose is unknown


def read_coco(path: PathLike) -> CocoFile:
    """The instances file at ``path``; a file that is not COCO-shaped at all is one :class:`InputError`."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path} is not a COCO instances file: it needs 'images' and 'annotations' lists.")
    if not isinstance(data.get("categories"), list):
        raise InputError(f"{path} has no 'categories' list; COCO instance files name their categories there.")
    problems: Counter = Counter()
    image_ids = Counter(r.get("id") for r in data["images"] if isinstance(r, dict) and _is_id(r.get("id")))
    annotations: dict[Any, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in image_ids:
            problems["orphan_annotation"] += 1
            continue
        annotations.setdefault(image_id, []).append(ann)
    categories = {int(c["id"]): _clean_text(str(c.get("name", ""))) or f"#{c['id']}"
                  for c in data["categories"] if isinstance(c, dict) and _is_id(c.get("id"))}
    ids = Counter(a.get("id") for anns in annotations.values() for a in anns)
    expressions = _expressions(data.get("refs"), problems)
    problems["ref_unknown_annotation"] += sum(1 for ann_id in expressions if ann_id not in ids)
    return CocoFile(images=data["images"], annotations=annotations, categories=categories, expressions=expressions,
                    file_problems=+problems, duplicate_ids=frozenset(i for i, n in ids.items() if n > 1),
                    duplicate_images=frozenset(i for i, n in image_ids.items() if n > 1))


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _clean_text(text: str) -> str:
    """Text safe inside a question: no placeholder brackets, single spaces."""
    return " ".join(text.replace("[", " ").replace("]", " ").split())


def _expressions(refs: Any, problems: Counter) -> dict[int, list[str]]:
    """RefCOCO-style ``refs`` (``[{"ann_id", "sentences": [{"sent"}]}]``) -> annotation id -> sentences."""
    out: dict[int, list[str]] = {}
    for ref in refs if isinstance(refs, list) else []:
        sentences = ref.get("sentences") if isinstance(ref, dict) else None
        if not isinstance(ref, dict) or not _is_id(ref.get("ann_id")) or not isinstance(sentences, list):
            problems["bad_ref"] += 1
            continue
        texts = [_clean_text(s["sent"]) for s in sentences if isinstance(s, dict) and isinstance(s.get("sent"), str)]
        if not any(texts):
            problems["bad_ref"] += 1
            continue
        out.setdefault(ref["ann_id"], []).extend(t for t in texts if t)
    return out


# ---- instances of one image ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
    """One annotation where it is in the image. Ineligible instances (crowd, bad annotations, tiny
    ones) only compete for uniqueness; they are never a target or a reference."""

    ann_id: int
    kind: str  # category name, or "#<id>" for a category absent from 'categories'
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive: the mask's extent
    crop: np.ndarray  # [y1 - y0, x1 - x0] bool: the mask inside ``box``
    eligible: bool

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    @cached_property
    def dilated(self) -> np.ndarray:
        """[h + 2, w + 2] bool: the mask grown by one pixel (3x3), on ``box`` widened by one pixel."""
        padded = np.pad(self.crop, 1)  # the zero frame is what np.roll wraps in
        grown = np.zeros_like(padded)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= np.roll(np.roll(padded, dy, 0), dx, 1)
        return grown

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """Boolean [H, W] mask."""
        x0, y0, x1, y1 = self.box
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = self.crop
        return mask


@dataclasses.dataclass(frozen=True, eq=False)
class CocoLayout:
    """An image's instances as a :class:`segllm_jax.data.referring.Layout` (what the questions see)."""

    instances: tuple[Instance, ...]
    image_hw: tuple[int, int]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(i.kind for i in self.instances)

    @property
    def colors(self) -> tuple[None, ...]:
        return (None,) * len(self.instances)

    @cached_property
    def areas(self) -> np.ndarray:
        """[N] mask pixel counts."""
        return np.array([i.area for i in self.instances], np.int64)

    @cached_property
    def centers(self) -> np.ndarray:
        """[N, 2] (x, y) centres of the masks' boxes: where a person points, not a centroid off the object."""
        return np.array([((i.box[0] + i.box[2]) / 2, (i.box[1] + i.box[3]) / 2) for i in self.instances],
                        np.float64).reshape(-1, 2)

    @cached_property
    def adjacency(self) -> np.ndarray:
        """[N, N] bool: masks overlap or touch (8-neighbourhood)."""
        n = len(self.instances)
        adj = np.zeros((n, n), bool)
        for a in range(n):
            for b in range(a + 1, n):
                adj[a, b] = adj[b, a] = _touch(self.instances[a], self.instances[b])
        return adj

    @property
    def eligible(self) -> list[int]:
        return [k for k, i in enumerate(self.instances) if i.eligible]


def _touch(a: Instance, b: Instance) -> bool:
    """Whether ``a`` dilated by one pixel (3x3) meets ``b``, computed on the window their boxes share."""
    x0, y0 = max(a.box[0] - 1, b.box[0]), max(a.box[1] - 1, b.box[1])
    x1, y1 = min(a.box[2] + 1, b.box[2]), min(a.box[3] + 1, b.box[3])
    if x0 >= x1 or y0 >= y1:
        return False
    ay, ax = a.box[1] - 1, a.box[0] - 1  # image coordinates of a.dilated[0, 0]
    window_a = a.dilated[y0 - ay:y1 - ay, x0 - ax:x1 - ax]
    window_b = b.crop[y0 - b.box[1]:y1 - b.box[1], x0 - b.box[0]:x1 - b.box[0]]
    return bool(np.any(window_a & window_b))


def _box_from_bbox(bbox: Any, height: int, width: int) -> tuple[int, int, int, int] | None:
    """COCO ``bbox`` [x, y, w, h] -> pixel box clipped to the image, or None if unusable."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _degenerate_polygon(segmentation: list) -> str | None:
    """Why a polygon list cannot be a mask, or None. (pycocotools would read a 4-number "polygon" as a
    box and a 2-point one as garbage, so this is checked before it sees them.)"""
    if not segmentation:
        return "an empty polygon list"
    for polygon in segmentation:
        if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    and math.isfinite(v) for v in polygon):
            return "a polygon with non-numeric coordinates"
        if len(polygon) < 6 or len(polygon) % 2:
            return f"a polygon of {len(polygon)} numbers (3 or more x, y points are needed)"
    return None


def locate_instance(ann: dict[str, Any], coco: CocoFile, hw: tuple[int, int],
              min_area: float) -> tuple[Instance | None, Problem | None]:
    """One annotation as an :class:`Instance` (ineligible when it has a problem), and its problem.
    ``(None, problem)`` means it cannot even be located."""
    height, width = hw
    categories = coco.categories
    ann_id, category = ann.get("id"), ann.get("category_id")
    if not _is_id(ann_id) or not _is_id(category) or ann_id in coco.duplicate_ids:
        why = "an id used by several annotations" if ann_id in coco.duplicate_ids else "no integer id or category_id"
        problem = Problem("bad_annotation_record", why, ann_id if _is_id(ann_id) else None)
        return _blocker(ann, f"#{category}", hw, problem)
    problem = None
    if category not in categories:
        problem = Problem("unknown_category", f"category_id {category} is not in 'categories'", ann_id)
    elif ann.get("iscrowd"):
        problem = Problem("crowd", "a crowd region (iscrowd=1) names no single instance", ann_id)
    kind = categories.get(category, f"#{category}")
    segmentation = ann.get("segmentation")
    if not segmentation:
        return _blocker(ann, kind, hw, problem or Problem("no_mask", "no segmentation", ann_id))
    if isinstance(segmentation, list):
        why = _degenerate_polygon(segmentation)
        if why:
            return _blocker(ann, kind, hw, problem or Problem("degenerate_polygon", why, ann_id))
    try:
        mask = segmentation_to_mask(segmentation, height, width)  # [H, W] bool
    except (InputError, AttributeError, TypeError) as err:
        detail = str(err) if isinstance(err, InputError) else f"not a polygon list or RLE ({type(err).__name__})"
        return _blocker(ann, kind, hw, problem or Problem("undecodable_segmentation", detail, ann_id))
    extent = mask_box(mask)
    if extent is None:
        why = "the polygon has zero area" if isinstance(segmentation, list) else "the mask is empty"
        return _blocker(ann, kind, hw, problem or Problem("degenerate_polygon", why, ann_id))
    box = tuple(int(v) for v in extent)
    crop = mask[box[1]:box[3], box[0]:box[2]]
    eligible = problem is None and crop.sum() >= min_area
    return Instance(ann_id, kind, box, crop, eligible), problem


def _blocker(ann: dict[str, Any], kind: str, hw: tuple[int, int],
             problem: Problem) -> tuple[Instance | None, Problem]:
    """An unusable annotation stands in the image as its box (it still competes), or cannot be located."""
    box = _box_from_bbox(ann.get("bbox"), *hw)
    if box is None:
        return None, problem
    crop = np.ones((box[3] - box[1], box[2] - box[0]), bool)
    return Instance(ann.get("id") if _is_id(ann.get("id")) else -1, kind, box, crop, False), problem


# ---- image records and files ----------------------------------------------------------------------


def image_record(record: Any) -> tuple[Any, str, tuple[int, int]] | Problem:
    """(id, file_name, (height, width)) of an image record, or the problem with it."""
    if not isinstance(record, dict):
        return Problem("bad_image_record", "not an object")
    image_id, file_name, height, width = (record.get(k) for k in ("id", "file_name", "height", "width"))
    if not _is_id(image_id) or not isinstance(file_name, str) or not file_name:
        return Problem("bad_image_record", "no integer id or no file_name")
    if not (_is_id(height) and _is_id(width) and height > 0 and width > 0):
        return Problem("bad_image_record", "height and width must be positive integers")
    return image_id, file_name, (int(height), int(width))


def check_image_file(images_dir: Path, file_name: str, hw: tuple[int, int]) -> Problem | None:
    """The file exists, is a picture of the recorded size, and the training loader finds it by this name."""
    from segllm_jax.preprocess import check_image_size

    if _PAYLOAD_CHARS.search(file_name) or Path(file_name).is_absolute() or ".." in Path(file_name).parts:
        return Problem("unusable_file_name", f"{file_name!r} is absolute, leaves --images, or holds one of '[]|:'")
    path = images_dir / file_name
    if not path.is_file():
        return Problem("missing_image", f"{path} does not exist")
    try:
        with Image.open(path) as img:  # the header only: cheap for every image of a large set
            width, height = img.size
        check_image_size(width, height, str(path))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return Problem("unreadable_image", f"{path} is not a readable picture ({type(err).__name__})")
    except InputError as err:
        return Problem("unreadable_image", str(err))
    if (height, width) != hw:
        return Problem("size_mismatch", f"{path} is {height}x{width}, the record says {hw[0]}x{hw[1]}")
    try:
        found = resolve_image_path(images_dir, file_name)
    except InputError:
        found = None
    if found is None or found.resolve() != path.resolve():
        return Problem("unusable_file_name", f"the loader's RefCOCO path fix-ups (docs/architecture.md §E1) turn "
                                             f"{file_name!r} into another file; rename it (no 'val2014' or 'new_' in "
                                             "the path)")
    return None
