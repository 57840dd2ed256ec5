"""Annotation registers: (dataset name, mask id) -> binary mask at original resolution (architecture.md §E1).

Placeholders name masks as ``img|dataset|mask_id``; what ``mask_id`` means depends on the dataset:

============================  ========================================  ==============================
kind (default for names)      file(s)                                   mask id
============================  ========================================  ==============================
``coco`` (refcoco, refcoco+,  COCO-style instances json (RLE or         annotation id
refcocog, paco_lvis, lvis)    polygons; LVIS/PACO use the same layout)
``labelme`` (reason_seg)      one LabelMe json per image (``shapes``)   ignored (union of the polygons)
``ade20k``                    one class-id PNG per image; 0 -> 255,     class id
                              then -1 (255 stays "ignore")
``cocostuff``                 one class-id PNG per image                class id
``json`` (visual_genome,      one json: id -> RLE, or id ->             key
pascal, mrshapes,             ``{"segmentation", "image_dim"}``
description_based_coco)
============================  ========================================  ==============================

Readers load lazily and drop their caches when pickled, so a registry is cheap to send to grain
worker processes and each process reads each file once. Every failure to produce a mask (missing
file or id, corrupt encoding, size mismatch with the image) raises :class:`InputError`, which the
input pipeline counts and skips.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from pycocotools import mask as mask_utils

from segllm_jax.data.rle import rle_decode
from segllm_jax.errors import ConfigError, InputError

PathLike = Union[str, os.PathLike]

KINDS = ("coco", "labelme", "ade20k", "cocostuff", "json")
#: The original register picked the reader from the dataset name (register_dataset.py); any other
#: name is a COCO-style json.
_KIND_BY_NAME = {
    "reason_seg": "labelme",
    "ade20k": "ade20k",
    "cocostuff": "cocostuff",
    "visual_genome": "json",
    "pascal": "json",
    "description_based_coco": "json",
    "mrshapes": "json",
}


class MaskReader(Protocol):
    def mask(self, mask_id: str, image_file: str, image_hw: tuple[int, int]) -> np.ndarray:
        """Boolean ``[H, W]`` mask; ``image_file`` is the placeholder's path, ``image_hw`` the image size."""


# ----------------------------------------------------------------------------------------------
# Helpers


def load_json(path: PathLike) -> Any:
    """JSON with the original's cp1252 fallback (some LabelMe files are not UTF-8)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"annotation file {path} cannot be read ({err.strerror}).") from None
    for encoding in ("utf-8", "cp1252"):
        try:
            return json.loads(raw.decode(encoding))
        except UnicodeDecodeError:
            continue
        except json.JSONDecodeError as err:
            raise InputError(f"annotation file {path} is not valid JSON ({err.msg}, line {err.lineno}).") from None
    raise InputError(f"annotation file {path} is neither UTF-8 nor cp1252 text.")


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) -> boolean ``[H, W]``.

    ``height``/``width`` come from the image record (COCO) or the entry's ``size``/``image_dim``.
    pycocotools signals bad input with a bare ``Exception`` (or TypeError/ValueError from its C
    layer), so any exception while decoding means a corrupt annotation and becomes ``InputError``.
    """
    try:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):
            # checked NumPy decoder: pycocotools would silently pad or cut counts of the wrong total
            return rle_decode({"size": [height, width], "counts": segmentation["counts"]})
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        mask = mask_utils.decode(rle)
    except Exception as err:  # noqa: BLE001 - see docstring
        raise InputError(f"a segmentation cannot be decoded ({type(err).__name__}: {str(err)[:80]}).") from None
    if mask.shape != (height, width):
        raise InputError(f"a segmentation decodes to {mask.shape}, expected {(height, width)}.")
    return mask.astype(bool)


def _check_size(mask: np.ndarray, image_hw: tuple[int, int], what: str) -> np.ndarray:
    if mask.shape != tuple(image_hw):
        raise InputError(f"{what} is {mask.shape[0]}x{mask.shape[1]} but the image is "
                         f"{image_hw[0]}x{image_hw[1]}; the annotation belongs to another image.")
    return mask


def _class_id(mask_id: str) -> int:
    try:
        return int(mask_id)
    except ValueError:
        raise InputError(f"mask id {mask_id!r} must be an integer class id.") from None


def _per_image_file(folder: Path, image_file: str, suffix: str) -> Path:
    """Per-image annotation next to nothing but its stem: ``a/b/x.jpg`` -> ``folder/x<suffix>``."""
    return folder / (Path(image_file).stem + suffix)


def _read_label_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            labels = np.asarray(img)
    except FileNotFoundError:
        raise InputError(f"label map {path} does not exist.") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise InputError(f"label map {path} cannot be decoded ({type(err).__name__}).") from None
    if labels.ndim != 2:
        raise InputError(f"label map {path} must be single-channel, got shape {labels.shape}.")
    return labels


# ----------------------------------------------------------------------------------------------
# Readers


@dataclass
class CocoRegister:
    """COCO-style instances json: annotation id -> ``annToMask`` (refcoco/+/g, paco_lvis, lvis)."""

    path: Path
    _anns: dict[int, dict[str, Any]] | None = field(default=None, repr=False)
    _sizes: dict[Any, tuple[int, int]] = field(default_factory=dict, repr=False)

    def mask(self, mask_id: str, image_file: str, image_hw: tuple[int, int]) -> np.ndarray:
        anns = self._index()
        try:
            ann = anns[int(mask_id)]
        except (ValueError, KeyError):
            raise InputError(f"annotation id {mask_id!r} is not in {self.path}.") from None
        size = self._sizes.get(ann.get("image_id"))
        if size is None:
            raise InputError(f"annotation {mask_id} of {self.path} names an image without height/width.")
        mask = segmentation_to_mask(ann.get("segmentation"), *size)
        return _check_size(mask, image_hw, f"annotation {mask_id} of {self.path}")

    def _index(self) -> dict[int, dict[str, Any]]:
        if self._anns is None:
            data = load_json(self.path)
            if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
                raise InputError(f"{self.path} is not a COCO-style json (no 'annotations' list).")
            self._sizes = {img["id"]: (int(img["height"]), int(img["width"]))
                           for img in data.get("images", []) if {"id", "height", "width"} <= img.keys()}
            self._anns = {int(a["id"]): a for a in data["annotations"] if "id" in a}
        return self._anns

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_anns": None, "_sizes": {}}


@dataclass
class LabelMeRegister:
    """ReasonSeg: one LabelMe json per image; the mask is every polygon except "flag" (deprecated)
    and "ignore" ones, filled (the mask id is not used)."""

    folder: Path

    def mask(self, mask_id: str, image_file: str, image_hw: tuple[int, int]) -> np.ndarray:
        path = _per_image_file(self.folder, image_file, ".json")
        data = load_json(path)
        shapes = data.get("shapes") if isinstance(data, dict) else None
        if not isinstance(shapes, list):
            raise InputError(f"{path} has no LabelMe 'shapes' list.")
        height, width = image_hw
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for shape in shapes:
            label = str(shape.get("label", "")).lower()
            if label == "flag" or "ignore" in label:
                continue
            draw.polygon(_polygon_points(shape.get("points"), path), fill=1, outline=1)
        return np.asarray(canvas, bool)


def _polygon_points(points: Any, path: Path) -> list[tuple[int, int]]:
    """Integer vertices, truncated like the original's ``np.int32`` cast before ``cv2.fillPoly``."""
    try:
        xy = np.asarray(points, np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: a polygon has non-numeric points.") from None
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 2 or not np.all(np.isfinite(xy)):
        raise InputError(f"{path}: a polygon needs at least two finite (x, y) points, got shape {xy.shape}.")
    return [(int(x), int(y)) for x, y in xy]


@dataclass
class Ade20kRegister:
    """ADE20K semantic PNGs: 0 (unlabelled) -> 255, other values -1, so mask id k is PNG value k+1."""

    folder: Path

    def mask(self, mask_id: str, image_file: str, image_hw: tuple[int, int]) -> np.ndarray:
        path = _per_image_file(self.folder, image_file, ".png")
        labels = _read_label_png(path).astype(np.int64)
        shifted = np.where((labels == 0) | (labels == 255), 255, labels - 1)
        return _check_size(shifted == _class_id(mask_id), image_hw, str(path))


@dataclass
class CocoStuffRegister:
    """COCO-Stuff PNGs: mask id k is PNG value k."""

    folder: Path

    def mask(self, mask_id: str, image_file: str, image_hw: tuple[int, int]) -> np.ndarray:
        path = _per_image_file(self.folder, image_file, ".png")
        return _check_size(_read_label_png(path) == _class_id(mask_id), image_hw, str(path))


@dataclass
class JsonMaskRegister:
    """One json dict: id -> RLE (visual_genome, pascal, mrshapes) or id -> ``{"segmentation",
    "image_dim": [h, w]}`` (description_based_coco)."""

    path: Path
    _data: dict[str, Any] | None = field(default=None, repr=False)

    def mask(self, mask_id: str, image_file: str, image_hw: tuple[int, int]) -> np.ndarray:
        if self._data is None:
            data = load_json(self.path)
            if not isinstance(data, dict):
                raise InputError(f"{self.path} must hold a JSON object mask id -> RLE.")
            self._data = data
        entry = self._data.get(mask_id)
        if not isinstance(entry, dict):
            raise InputError(f"mask id {mask_id!r} is not in {self.path}.")
        if "segmentation" in entry:
            segmentation, size = entry["segmentation"], entry.get("image_dim")
        else:
            segmentation, size = entry, entry.get("size")
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise InputError(f"mask {mask_id!r} of {self.path} has no [height, width].")
        mask = segmentation_to_mask(segmentation, int(size[0]), int(size[1]))
        return _check_size(mask, image_hw, f"mask {mask_id!r} of {self.path}")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_data": None}


_READERS = {"coco": CocoRegister, "labelme": LabelMeRegister, "ade20k": Ade20kRegister,
            "cocostuff": CocoStuffRegister, "json": JsonMaskRegister}


# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class RegisterSpec:
    """One entry of the original's annotation yaml: ``name``, ``path`` and an optional ``path_eval``
    (registered as ``<name>_eval`` and used when evaluating). ``kind`` defaults from the name."""

    name: str
    path: str
    path_eval: str | None = None
    kind: str | None = None

    @property
    def resolved_kind(self) -> str:
        kind = self.kind or _KIND_BY_NAME.get(self.name, "coco")
        if kind not in KINDS:
            raise ConfigError(f"register {self.name!r}: kind must be one of {KINDS}, got {kind!r}.")
        return kind


class AnnotationRegistry:
    """Dataset name -> reader, built from register specs with paths relative to ``annotations_root``."""

    def __init__(self, specs: Sequence[RegisterSpec], annotations_root: PathLike) -> None:
        root = Path(annotations_root)
        self._readers: dict[str, MaskReader] = {}
        for spec in specs:
            reader = _READERS[spec.resolved_kind]
            self._readers[spec.name] = reader(root / spec.path)
            if spec.path_eval is not None:
                self._readers[f"{spec.name}_eval"] = reader(root / spec.path_eval)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._readers)

    def mask(self, dataset: str, mask_id: str, image_file: str, image_hw: tuple[int, int],
             *, is_eval: bool = False) -> np.ndarray:
        """Boolean ``[H, W]`` mask; evaluation prefers ``<dataset>_eval`` where one is registered."""
        if is_eval and f"{dataset}_eval" in self._readers:
            dataset = f"{dataset}_eval"
        reader = self._readers.get(dataset)
        if reader is None:
            raise InputError(f"dataset {dataset!r} has no annotation register (known: {sorted(self._readers)}).")
        return reader.mask(mask_id, image_file, image_hw)


def read_register_specs(path: PathLike) -> list[RegisterSpec]:
    """Specs from an original annotation yaml (``datasets: [{name, path, path_eval?}]``)."""
    import yaml  # a transformers dependency; only needed for the original's config files

    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    entries = config.get("datasets") if isinstance(config, Mapping) else None
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "name" in e and "path" in e
                                                for e in entries):
        raise ConfigError(f"{path} must hold 'datasets:' entries with a name and a path.")
    return [RegisterSpec(str(e["name"]), str(e["path"]), e.get("path_eval"), e.get("kind")) for e in entries]


# ----------------------------------------------------------------------------------------------
# Image paths


def resolve_image_path(images_root: PathLike, image_file: str) -> Path:
    """The image file a placeholder names, with the original loader's fix-ups (§E1).

    Always: ``val2014`` -> ``train2014`` (RefCOCO images are all from train2014), ``new_`` removed,
    Visual Genome folders moved under ``vg/``. If that file is missing: ``val2017`` -> ``train2017``
    (LVIS val images) and ``images/`` -> ``object365/``. The original applied only the second group to
    ``IMAGE256``; applying both everywhere keeps the CLIP image and the annotated image the same file.
    """
    relative = image_file.replace("val2014", "train2014").replace("new_", "")
    if "VG_100K" in relative and not relative.startswith("vg/"):
        relative = "vg/" + relative.lstrip("./")
    path = Path(images_root) / relative
    if not path.is_file():
        path = Path(images_root) / relative.replace("val2017", "train2017").replace("images/", "object365/")
    if not path.is_file():
        raise InputError(f"image {image_file!r} is missing under {images_root} "
                         "(tried the fix-ups of docs/architecture.md §E1).")
    return path
