"""Multi-round referring conversations from your own COCO-format annotations (``segllm-jax make-conversations``).

Why: people want to fine-tune on their own annotated images, and what they have is a COCO instances
file (boxes, polygons or RLE, categories), not SegLLM conversations. This module turns one into the
released conversation JSON plus an annotation register, the files ``segllm-jax train`` and ``eval``
read, with the same guarantees as MR-Shapes (:mod:`segllm_jax.data.referring` is shared):

* round 1 names an instance by its category ("the dog"), a superlative the masks support ("the
  largest dog", "the leftmost object"), or, when the file carries RefCOCO-style ``refs``, a
  human-written expression;
* every later round names a new target only through an earlier answer ("the person nearest to
  instance 1", "the nearest object to the left of instance 2"), computed from the masks, unique by a
  margin, and reference-dependent (the same words about another instance give another answer).

Honesty about what is *not* known: an annotation that cannot be used (a crowd region, a degenerate
polygon, a category absent from ``categories``, an undecodable segmentation) is reported and never
becomes a target or a reference, but it still stands in the image (as its mask, or its box) and
competes in every uniqueness test, so "the only dog" is never said of an image with a second,
badly annotated dog. Instances smaller than ``min_target_fraction`` of the image also only compete.
An annotation that cannot even be located makes its image unusable. Every skipped image and
annotation is counted in ``OUT/report.json`` (per image, with the reason) and printed at the end.

Output (``write_conversations``), written as a hidden sibling of OUT and renamed when complete::

    OUT/conversations/<name>.json   released-format conversations; image paths relative to --images
    OUT/annotations/<name>.json     register {annotation id: COCO compressed RLE} of every mask a round
                                    names (read by registers.JsonMaskRegister)
    OUT/data.json                   what ``segllm-jax eval --data`` takes (absolute paths);
                                    :func:`mixture` makes the training ``MixtureConfig`` from OUT
    OUT/report.json                 counts and per-image problems

Deterministic: image i's k-th conversation draws from ``default_rng([seed, i, k])`` (i = position in
the file's ``images`` list), so the same file and seed give the same conversations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from segllm_jax.data.mixture import ConversationFile, MixtureConfig
from segllm_jax.data.referring import (
    EXPRESSION,
    REFERRING_RELATIONS,
    Conversation,
    ConversationRules,
    Query,
    conversation_to_json,
    generate_conversation,
    question_type,
)
from segllm_jax.data.registers import RegisterSpec, load_json, resolve_image_path, segmentation_to_mask
from segllm_jax.data.rle import register_text, rle_encode_compressed
from segllm_jax.errors import InputError
from segllm_jax.outputs import atomic_write_text, written_atomically
from segllm_jax.preprocess import mask_box

PathLike = Union[str, os.PathLike]

DEFAULT_NAME = "coco_conversations"
DATA_FILE, REPORT_FILE = "data.json", "report.json"
#: COCO has no colour words, so "same color" is never asked; unrestricted instances are "objects".
COCO_RULES = ConversationRules(min_rounds=1, relations=tuple(r for r in REFERRING_RELATIONS if r != "same_color"),
                               default_noun="object")

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
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PAYLOAD_CHARS = re.compile(r"[\[\]|:]")  # would break a placeholder's payload (architecture.md §D1)


@dataclasses.dataclass(frozen=True)
class CocoOptions:
    """How conversations are made (``make-conversations``' options)."""

    rounds: int = 4  # at most, per conversation; each length in [1, rounds] is drawn
    per_image: int = 1  # conversations drawn per image (identical ones are dropped)
    seed: int = 0
    name: str = DEFAULT_NAME  # dataset name in the placeholders, the register and the file names
    min_target_fraction: float = 0.0025  # smaller instances only compete for uniqueness
    expression_share: float = 0.5  # how often round 1 uses a human-written expression when there is one

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.per_image < 1 or self.seed < 0:
            raise InputError(f"need rounds >= 1, per_image >= 1 and seed >= 0 (got {self.rounds}, "
                             f"{self.per_image}, {self.seed}).")
        if not _NAME.match(self.name):
            raise InputError(f"the dataset name {self.name!r} must be 1-64 letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit.")
        if not 0.0 <= self.min_target_fraction < 1.0 or not 0.0 <= self.expression_share <= 1.0:
            raise InputError("min_target_fraction must be in [0, 1) and expression_share in [0, 1].")

    @property
    def rules(self) -> ConversationRules:
        return dataclasses.replace(COCO_RULES, expression_share=self.expression_share)


# ----------------------------------------------------------------------------------------------
# Reading the COCO file


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


# ----------------------------------------------------------------------------------------------
# Instances of one image


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


def _instance(ann: dict[str, Any], coco: CocoFile, hw: tuple[int, int],
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


# ----------------------------------------------------------------------------------------------
# One image


@dataclasses.dataclass(frozen=True, eq=False)
class ImageResult:
    """What one image gives: conversation entries, the masks they name, and what was skipped."""

    image_id: Any
    file_name: Any
    entries: list[dict[str, Any]]
    masks: dict[str, np.ndarray]  # register id -> [H, W] bool
    problems: list[Problem]
    skipped: Problem | None = None  # set when the whole image was skipped
    too_small: int = 0  # usable instances below the target size (they only compete)
    layout: CocoLayout | None = None  # what the questions saw (tests re-check every round against it)
    conversations: tuple[Conversation, ...] = ()  # ``entries`` before formatting

    def report(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "file_name": self.file_name,
                "skipped": self.skipped.as_json() if self.skipped else None,
                "problems": [p.as_json() for p in self.problems]}


def _image_record(record: Any) -> tuple[Any, str, tuple[int, int]] | Problem:
    """(id, file_name, (height, width)) of an image record, or the problem with it."""
    if not isinstance(record, dict):
        return Problem("bad_image_record", "not an object")
    image_id, file_name, height, width = (record.get(k) for k in ("id", "file_name", "height", "width"))
    if not _is_id(image_id) or not isinstance(file_name, str) or not file_name:
        return Problem("bad_image_record", "no integer id or no file_name")
    if not (_is_id(height) and _is_id(width) and height > 0 and width > 0):
        return Problem("bad_image_record", "height and width must be positive integers")
    return image_id, file_name, (int(height), int(width))


def _check_image_file(images_dir: Path, file_name: str, hw: tuple[int, int]) -> Problem | None:
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


def image_conversations(coco: CocoFile, position: int, images_dir: Path, options: CocoOptions) -> ImageResult:
    """Conversations about image ``position`` of the file; never raises for bad data (it is reported)."""
    record = _image_record(coco.images[position])
    if isinstance(record, Problem):
        raw = coco.images[position] if isinstance(coco.images[position], dict) else {}
        return ImageResult(raw.get("id"), raw.get("file_name"), [], {}, [], skipped=record)
    image_id, file_name, hw = record
    skipped = _check_image_file(images_dir, file_name, hw) if image_id not in coco.duplicate_images else \
        Problem("duplicate_image_id", f"several image records have id {image_id}")
    if skipped is not None:
        return ImageResult(image_id, file_name, [], {}, [], skipped=skipped)
    min_area = options.min_target_fraction * hw[0] * hw[1]
    instances, problems, too_small = [], [], 0
    for ann in coco.annotations.get(image_id, []):
        instance, problem = _instance(ann, coco, hw, min_area)
        if instance is None:
            why = Problem("unlocatable_annotation", "an unusable annotation without a bbox could be any object "
                          "anywhere, so no question about this image is safe", problem.annotation_id)
            return ImageResult(image_id, file_name, [], {}, problems + [problem], skipped=why)
        instances.append(instance)
        if problem is not None:
            problems.append(problem)
        elif not instance.eligible:
            too_small += 1
    layout = CocoLayout(tuple(instances), hw)
    conversations = _conversations(layout, coco.expressions, position, options) if layout.eligible else []
    if not conversations:
        why = Problem("no_unique_referent", "no usable instance can be named uniquely (e.g. only two of a kind)") \
            if layout.eligible else Problem("no_instances", f"{len(instances)} annotations, none usable as a target")
        return ImageResult(image_id, file_name, [], {}, problems, skipped=why, too_small=too_small, layout=layout)
    mask_ids = [str(i.ann_id) for i in layout.instances]
    entries = [conversation_to_json(c, file_name, options.name, mask_ids, f"{options.name}_{image_id}_{k}")
               for k, c in enumerate(conversations)]
    named = sorted({r.target for c in conversations for r in c.rounds})  # references are earlier targets
    masks = {mask_ids[i]: layout.instances[i].full_mask(*hw) for i in named}
    return ImageResult(image_id, file_name, entries, masks, problems, too_small=too_small, layout=layout,
                       conversations=tuple(conversations))


def _conversations(layout: CocoLayout, expressions: Mapping[int, list[str]], position: int,
                   options: CocoOptions) -> list[Conversation]:
    """Up to ``options.per_image`` distinct, non-empty conversations about one image."""
    eligible = layout.eligible
    sentences = [(Query(EXPRESSION, expression=text), k) for k in eligible
                 for text in expressions.get(layout.instances[k].ann_id, [])]
    out, seen = [], set()
    for k in range(options.per_image):
        rng = np.random.default_rng([options.seed, position, k])
        conversation = generate_conversation(layout, rng, options.rounds, options.rules, eligible, sentences)
        key = tuple((r.query, r.target, r.ref_round) for r in conversation.rounds)
        if conversation.rounds and key not in seen:
            seen.add(key)
            out.append(conversation)
    return out


# ----------------------------------------------------------------------------------------------
# The whole file


@dataclasses.dataclass(frozen=True)
class ConversationFiles:
    """Where ``write_conversations`` put things."""

    out: Path
    conversations: Path
    register: Path
    data: Path
    report: Path
    summary: str  # the printed summary (counts of what was made and skipped)


def write_conversations(coco_path: PathLike, images_dir: PathLike, out: PathLike,
                        options: CocoOptions = CocoOptions(), *, progress: bool = True) -> ConversationFiles:
    """Reads ``coco_path``, makes conversations about the images under ``images_dir`` and writes them to
    the new folder ``out`` (atomically: a hidden sibling renamed when complete). Raises
    :class:`InputError` only when the file is unusable as a whole or no conversation could be made."""
    from tqdm.auto import tqdm

    images_dir, out = Path(images_dir).absolute(), Path(out).absolute()
    coco = read_coco(coco_path)
    entries, register, results = [], {}, []
    # a terminal sees the bar, then it clears itself: a pipe or a log gets no bar (an error stays one line)
    bar = tqdm(range(len(coco.images)), desc="conversations", unit="image", leave=False,
               disable=None if progress else True)
    for position in bar:
        result = image_conversations(coco, position, images_dir, options)
        entries += result.entries
        register.update({m: rle_encode_compressed(mask) for m, mask in result.masks.items()})
        results.append(dataclasses.replace(result, masks={}, layout=None))  # pixels are done with: memory stays flat
    report = _report(coco, results, options, coco_path, images_dir)
    summary = _summary(report, out)
    if not entries:
        raise InputError(f"no conversation could be made from {coco_path}: {_reasons(report)}; "
                         "check --images and the annotations.")
    files = ConversationFiles(out, out / "conversations" / f"{options.name}.json",
                              out / "annotations" / f"{options.name}.json", out / DATA_FILE, out / REPORT_FILE, summary)
    with written_atomically(out) as tmp:
        for folder in ("conversations", "annotations"):
            (tmp / folder).mkdir()
        rel = lambda p: tmp / p.relative_to(out)  # noqa: E731 - same layout, inside the temporary folder
        atomic_write_text(rel(files.conversations), json.dumps(entries, indent=1) + "\n")
        atomic_write_text(rel(files.register), register_text(register))
        data = {"conversations": [str(files.conversations)],
                "registers": [{"name": options.name, "path": str(files.register), "kind": "json"}],
                "images_root": str(images_dir)}
        atomic_write_text(rel(files.data), json.dumps(data, indent=1) + "\n")
        atomic_write_text(rel(files.report), json.dumps(report, indent=1) + "\n")
    return files


def _report(coco: CocoFile, results: Sequence[ImageResult], options: CocoOptions, coco_path: PathLike,
            images_dir: Path) -> dict[str, Any]:
    """Counts of what was made and skipped, and every image with a problem."""
    skipped = Counter(r.skipped.kind for r in results if r.skipped)
    bad_annotations = Counter(p.kind for r in results for p in r.problems)
    conversations = [c for r in results for c in r.conversations]
    rounds = [len(c.rounds) for c in conversations]
    # grouped as `eval` groups them: a referring round by its relation, a first round by its words
    types = Counter(question_type(r.question, None if r.ref_round is None else r.query.relation)
                    for c in conversations for r in c.rounds)
    return {
        "coco": str(Path(coco_path).absolute()), "images_dir": str(images_dir), "options": dataclasses.asdict(options),
        "images": {"total": len(results), "used": sum(1 for r in results if r.entries),
                   "skipped": sum(skipped.values())},
        "skipped_images": dict(sorted(skipped.items())),
        "annotations": {"total": sum(map(len, coco.annotations.values())) + coco.file_problems["orphan_annotation"],
                        "skipped": sum(bad_annotations.values()),
                        "too_small_to_name": sum(r.too_small for r in results)},
        "skipped_annotations": dict(sorted(bad_annotations.items())),
        "file_problems": dict(sorted(coco.file_problems.items())),
        "conversations": len(conversations), "rounds": sum(rounds),
        "conversations_by_rounds": {str(n): c for n, c in sorted(Counter(rounds).items())},
        "rounds_by_type": dict(sorted(types.items())),
        "per_image": [r.report() for r in results if r.skipped or r.problems],
    }


def _reasons(report: Mapping[str, Any]) -> str:
    parts = [f"{n} {IMAGE_PROBLEMS.get(k, k)}" for k, n in report["skipped_images"].items()]
    parts += [f"{n} {ANNOTATION_PROBLEMS.get(k, k)}" for k, n in report["skipped_annotations"].items()]
    return ", ".join(parts) or f"the file lists {report['images']['total']} images"


def _summary(report: Mapping[str, Any], out: Path) -> str:
    lines = [f"{report['conversations']} conversations ({report['rounds']} rounds) from "
             f"{report['images']['used']} of {report['images']['total']} images -> {out}"]
    for title, counts, words in (("skipped images", report["skipped_images"], IMAGE_PROBLEMS),
                                 ("skipped annotations", report["skipped_annotations"], ANNOTATION_PROBLEMS),
                                 ("file problems", report["file_problems"], FILE_PROBLEMS)):
        lines += [f"{title}:"] + [f"  {n:6d}  {words.get(k, k)} ({k})" for k, n in counts.items()] if counts else []
    small = report["annotations"]["too_small_to_name"]
    if small:
        lines.append(f"{small} instances below {report['options']['min_target_fraction']:g} of their image are never "
                     "named (they still count in every uniqueness test)")
    lines.append(f"per-image details: {out / REPORT_FILE}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading the output back


def mixture(out: PathLike, weight: float = 1.0) -> MixtureConfig:
    """The training ``MixtureConfig`` of a folder written by :func:`write_conversations` (paths from the
    folder itself, so it may have been moved; the images folder is the one recorded in ``data.json``)."""
    out = Path(out)
    if not (out / DATA_FILE).is_file():
        raise InputError(f"{out} is not a make-conversations folder (it has no {DATA_FILE}); write it with "
                         f"`segllm-jax make-conversations --out {out}`.")
    data = load_json(out / DATA_FILE)
    try:
        name = data["registers"][0]["name"]
        images_root = data["images_root"]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{out / DATA_FILE} is not a make-conversations data file; write the folder again.") from None
    return MixtureConfig(conversations=(ConversationFile(f"{name}.json", weight),),
                         registers=(RegisterSpec(name, f"{name}.json", kind="json"),),
                         images_root=images_root, annotations_root=str(out / "annotations"),
                         conversations_root=str(out / "conversations"))

