"""MR-Shapes: a procedurally generated multi-round referring-segmentation benchmark.

Why it exists: SegLLM's point is that later rounds are answered *through the mask memory* (the
reference tokens of earlier answers). Real data (MR-RefCOCO) is large and licence-bound; MR-Shapes
gives a small, exactly-annotated, deterministic stand-in on which that ability can be trained and
measured end to end (conversation JSON → register → model → metrics).

A scene is 3–8 flat-coloured shapes (``KINDS``, colours from ``PALETTE``) painted in order on a
textured background; later shapes occlude earlier ones. Shapes are rasterised with NumPy by testing
pixel centres against the exact geometry (no anti-aliasing), and the background never uses a palette
colour, so every instance mask is exactly the set of pixels painted in its colour by that instance.

A conversation has up to 6 rounds. Round 1 names a shape directly ("the red circle", "the largest
star"). Every later round names its target only relative to an earlier answer ("the shape nearest to
instance 1"), and the generator emits such a round only if

* the answer is unique given the referenced instance (margins on distances, areas and positions make
  "nearest", "largest", "left of" robust, not just arg-max ties broken by index), and
* the answer *depends* on the reference: asking the same question about some other instance of the
  scene gives a different (defined) answer, so a model that ignores the reference cannot answer it
  (see ``depends_on_reference``).

The questions, their margins and these two checks are :mod:`segllm_jax.data.referring`'s (shared with
conversations from COCO annotations); a :class:`Scene` is one of its layouts.

On disk (``write_split``), following architecture.md §D1, §E1::

    <out>/images/mrshapes/<split>/<index>.png        images (paths in placeholders are relative
                                                     to <out>/images, like the original images_folder)
    <out>/annotations/mrshapes_<split>.json          register: {mask_id: COCO uncompressed RLE}
    <out>/conversations/mrshapes_<split>.json        list of {"id", "task", "conversations"}

``segllm_jax.data.tfds_sources.write_mrshapes`` writes the same scenes (``scene_record``) as a TFDS
dataset, one record per conversation with its image and masks.

Everything is a pure function of the seed (NumPy ``Generator`` only; one generator per scene,
seeded by ``(seed, split, index)``), so the same seed gives byte-identical files, and a split of n
scenes is a prefix of a split of n+k scenes.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image

from segllm_jax.data import referring
from segllm_jax.data.conversations import (  # noqa: F401  (re-exported: the MR-Shapes API reads its JSON)
    DecodeTarget,
    MaskRef,
    parse_decode,
    parse_mask_ref,
    parse_placeholders,
    read_conversations,
)
from segllm_jax.data.referring import (  # noqa: F401  (re-exported: MR-Shapes' questions are these)
    EXTREMES,
    REFERRING_RELATIONS,
    TEMPLATES,
    Conversation,
    Query,
    Round,
    answers_by_reference,
    depends_on_reference,
    describe,
    direct_options,
    generate_conversation,
    question_type,
    referring_options,
    resolve,
)
from segllm_jax.data.rle import register_text, rle_decode, rle_encode
from segllm_jax.errors import InputError

DATASET_NAME = "mrshapes"
SPLITS = ("train", "val", "test")
KINDS = ("circle", "square", "triangle", "star", "ring", "hexagon", "cross", "diamond")

# Every palette colour has a channel outside [_BG_LOW, _BG_HIGH], the range background pixels are
# clipped to, so no background pixel can ever equal a shape colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (30, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
_BG_LOW, _BG_HIGH = 64, 191

MIN_SIZE, MAX_SIZE = 128, 256
_MIN_SHAPES, _MAX_SHAPES = 3, 8
_MIN_VISIBLE_FRACTION = 0.6  # of a shape's own area, after everything drawn later
_MIN_AREA = 60  # pixels, so the smallest shape is still recognisable at 128 px
_PLACEMENT_TRIES = 60

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# Geometry and scenes


@dataclass(frozen=True)
class Shape:
    """One shape's exact geometry; ``raster`` is the only definition of which pixels it covers."""

    kind: str
    color: str
    center: tuple[float, float]  # (x, y) in pixels, x to the right, y down
    radius: float  # circumradius in pixels
    angle: float  # rotation in radians

    def polygon(self) -> np.ndarray | None:
        """[V, 2] (x, y) vertices in pixels, or None for the round kinds (circle, ring): what a
        polygon annotation of the unoccluded shape would hold (tests write scenes as COCO files)."""
        if self.kind in ("circle", "ring"):
            return None
        return _polygon(self.kind, self.radius, self.angle) + np.asarray(self.center)

    def raster(self, height: int, width: int) -> np.ndarray:
        """Boolean [H, W] mask of the pixels whose centre lies inside the shape (unoccluded)."""
        cx, cy = self.center
        r = self.radius
        y0, y1 = max(0, int(np.floor(cy - r))), min(height, int(np.ceil(cy + r)) + 1)
        x0, x1 = max(0, int(np.floor(cx - r))), min(width, int(np.ceil(cx + r)) + 1)
        py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        dx, dy = px - cx, py - cy
        if self.kind == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif self.kind == "ring":
            d2 = dx * dx + dy * dy
            inside = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
        else:
            inside = _inside_polygon(dx, dy, _polygon(self.kind, r, self.angle))
        full = np.zeros((height, width), bool)
        full[y0:y1, x0:x1] = inside
        return full


def _polygon(kind: str, r: float, angle: float) -> np.ndarray:
    """Vertices [V, 2] as (x, y) offsets from the centre, rotated by ``angle``."""
    if kind == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        pts = r * np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = r * np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "hexagon":
        t = np.arange(6) * np.pi / 3
        pts = r * np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = np.stack([radii * np.cos(t), radii * np.sin(t)], 1)
    elif kind == "diamond":
        pts = np.array([[0.0, -r], [0.6 * r, 0.0], [0.0, r], [-0.6 * r, 0.0]])
    elif kind == "cross":
        w = 0.33 * r
        pts = np.array([[w, -r], [w, -w], [r, -w], [r, w], [w, w], [w, r],
                        [-w, r], [-w, w], [-r, w], [-r, -w], [-w, -w], [-w, -r]])
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _inside_polygon(px: np.ndarray, py: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside if a ray to +x crosses the boundary an odd number of times."""
    inside = np.zeros(px.shape, bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (y1 > py) != (y2 > py)
        x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


@dataclass(frozen=True, eq=False)
class Scene:
    """An image, its instance map and the shapes in draw order (index = instance id); a
    :class:`segllm_jax.data.referring.Layout`, so the shared relations answer questions about it."""

    image: np.ndarray  # [H, W, 3] uint8
    instance_map: np.ndarray  # [H, W] int16: -1 background, i = shapes[i] visible there
    shapes: tuple[Shape, ...]

    def mask(self, index: int) -> np.ndarray:
        """Visible (post-occlusion) boolean mask of instance ``index``."""
        return self.instance_map == index

    @property
    def kinds(self) -> tuple[str, ...]:
        """[N] shape kinds: the nouns of the questions (``referring.Layout``)."""
        return tuple(s.kind for s in self.shapes)

    @property
    def colors(self) -> tuple[str, ...]:
        return tuple(s.color for s in self.shapes)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image.shape[:2]

    @cached_property
    def areas(self) -> np.ndarray:
        """[N] visible pixel counts."""
        return np.bincount(self.instance_map.ravel() + 1, minlength=len(self.shapes) + 1)[1:]

    @cached_property
    def centers(self) -> np.ndarray:
        """[N, 2] geometric centres (x, y): what a person points at, unlike an occluded centroid."""
        return np.array([s.center for s in self.shapes], np.float64)

    @cached_property
    def adjacency(self) -> np.ndarray:
        """[N, N] bool: visible masks touch (8-neighbourhood, incl. occlusion boundaries)."""
        return _adjacency(self.instance_map, len(self.shapes))


def _adjacency(instance_map: np.ndarray, n: int) -> np.ndarray:
    """[N, N] bool: instances with 8-neighbouring pixels (diagonal contact counts: it looks joined)."""
    adj = np.zeros((n, n), bool)
    m = instance_map
    pairs = ((m[:, :-1], m[:, 1:]), (m[:-1, :], m[1:, :]), (m[:-1, :-1], m[1:, 1:]), (m[:-1, 1:], m[1:, :-1]))
    for a, b in pairs:
        edge = (a != b) & (a >= 0) & (b >= 0)
        adj[a[edge], b[edge]] = True
    return adj | adj.T


def generate_scene(rng: np.random.Generator, size: int | tuple[int, int]) -> Scene:
    """A scene of 3–8 shapes at ``size`` (side, or (height, width)), each at least 60% visible."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    if not (MIN_SIZE <= height <= MAX_SIZE and MIN_SIZE <= width <= MAX_SIZE):
        raise InputError(f"MR-Shapes images are {MIN_SIZE}-{MAX_SIZE} px per side, got {height}x{width}.")
    while True:  # a scene that cannot fit 3 shapes is redrawn (rare; still deterministic)
        scene = _try_scene(rng, int(height), int(width))
        if scene is not None:
            return scene


def _try_scene(rng: np.random.Generator, height: int, width: int) -> Scene | None:
    # A small subset of colours and kinds per scene makes repeats common, which is what gives
    # referring questions ("the other red shape", "the nearest star to ...") something to resolve.
    colors = [str(c) for c in rng.choice(list(PALETTE), size=int(rng.integers(2, 5)), replace=False)]
    kinds = [str(k) for k in rng.choice(KINDS, size=int(rng.integers(2, 5)), replace=False)]
    n_wanted = int(rng.integers(_MIN_SHAPES, _MAX_SHAPES + 1))
    instance_map = np.full((height, width), -1, np.int16)
    shapes: list[Shape] = []
    full_areas: list[int] = []
    for _ in range(n_wanted):
        for _ in range(_PLACEMENT_TRIES):
            shape = _sample_shape(rng, height, width, colors, kinds)
            full = shape.raster(height, width)
            trial = instance_map.copy()
            trial[full] = len(shapes)
            areas = full_areas + [int(full.sum())]
            visible = np.bincount(trial.ravel() + 1, minlength=len(areas) + 1)[1:]
            if areas[-1] >= _MIN_AREA and np.all(visible >= _MIN_VISIBLE_FRACTION * np.array(areas)) \
                    and not _same_color_contact(trial, shapes + [shape]):
                instance_map, full_areas = trial, areas
                shapes.append(shape)
                break
    if len(shapes) < _MIN_SHAPES:
        return None
    image = _background(rng, height, width)
    colors_arr = np.array([PALETTE[s.color] for s in shapes], np.uint8)
    painted = instance_map >= 0
    image[painted] = colors_arr[instance_map[painted]]
    return Scene(image=image, instance_map=instance_map, shapes=tuple(shapes))


def _same_color_contact(instance_map: np.ndarray, shapes: Sequence[Shape]) -> bool:
    """Two touching shapes of one colour would look like a single blob, so scenes forbid it."""
    colors = np.array([s.color for s in shapes])
    return bool(np.any(_adjacency(instance_map, len(shapes)) & (colors[:, None] == colors[None, :])))


def _sample_shape(rng: np.random.Generator, height: int, width: int,
                  colors: Sequence[str], kinds: Sequence[str]) -> Shape:
    side = min(height, width)
    radius = float(rng.uniform(0.07, 0.17) * side)
    cx = float(rng.uniform(radius + 1, width - radius - 1))
    cy = float(rng.uniform(radius + 1, height - radius - 1))
    # Small rotations only: a square turned by 45° would be called a diamond.
    angle = float(rng.uniform(-0.25, 0.25))
    return Shape(kind=str(rng.choice(kinds)), color=str(rng.choice(colors)),
                 center=(cx, cy), radius=radius, angle=angle)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Noise, stripes, gradient or checker texture, clipped to the background-only value range."""
    style = str(rng.choice(["noise", "stripes", "gradient", "checker"]))
    # Greyish colours: far from the saturated palette for a person, not only for exact equality.
    c1, c2 = rng.uniform(90, 166, size=(2, 1)) + rng.uniform(-20, 20, size=(2, 3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = rng.uniform(0, np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)  # [H, W] coordinate along a random direction
    if style == "noise":
        cell = int(rng.integers(4, 17))
        coarse = rng.uniform(-40, 40, size=(height // cell + 1, width // cell + 1, 3))
        img = c1 + np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:height, :width]
    elif style == "stripes":
        period = rng.uniform(6, 24)
        t = (np.floor(along / period) % 2)[..., None]
        img = c1 * (1 - t) + c2 * t
    elif style == "gradient":
        t = ((along - along.min()) / max(np.ptp(along), 1.0))[..., None]
        img = c1 * (1 - t) + c2 * t
    else:
        cell = int(rng.integers(8, 33))
        t = ((np.floor(yy / cell) + np.floor(xx / cell)) % 2)[..., None]
        img = c1 * (1 - t) + c2 * t
    img = img + rng.integers(-8, 9, size=(height, width, 3))
    return np.clip(np.round(img), _BG_LOW, _BG_HIGH).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Questions (the relations themselves live in segllm_jax.data.referring)


def vocabulary_text() -> str:
    """Every word a generated question can contain, once (a tokenizer trained on a few scenes must
    still know the colour, kind and relation words those scenes happened not to use)."""
    queries = [Query("direct", kind=k, color=c, extreme=e) for k in (*KINDS, None) for c in (*PALETTE, None)
               for e in (*EXTREMES, None)]
    queries += [Query(r) for r in REFERRING_RELATIONS]
    phrases = [describe(q, ref_round=8) for q in queries] + [f"instance {k}" for k in range(1, 10)]
    return " ".join(t.format(p) for t in TEMPLATES for p in phrases[:1]) + " " + " ".join(phrases)


# ----------------------------------------------------------------------------------------------
# The register


def read_register(path: PathLike) -> dict[str, dict[str, Any]]:
    """An annotation register: JSON dict mask id → RLE."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_mask(register: Mapping[str, Mapping[str, Any]] | PathLike, mask_id: str) -> np.ndarray:
    """Boolean [H, W] mask ``mask_id`` from a register (a loaded dict, or its JSON path)."""
    if isinstance(register, (str, os.PathLike)):
        register = read_register(register)
    if mask_id not in register:
        raise InputError(f"mask id {mask_id!r} is not in the {DATASET_NAME} register; "
                         "check the split's annotation file.")
    return rle_decode(register[mask_id])


# ----------------------------------------------------------------------------------------------
# Conversation JSON (architecture.md §D1): writing (parsing lives in segllm_jax.data.conversations)


def conversation_to_json(conversation: Conversation, image: str, mask_ids: Sequence[str],
                         conv_id: str) -> dict[str, Any]:
    """One released-format entry of an MR-Shapes conversation (see ``referring.conversation_to_json``)."""
    return referring.conversation_to_json(conversation, image, DATASET_NAME, mask_ids, conv_id)


# ----------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class SplitFiles:
    conversations: Path
    register: Path
    images_root: Path  # placeholders' image paths are relative to this folder


def write_split(out_dir: PathLike, split: str, n: int, seed: int, max_rounds: int = 6) -> SplitFiles:
    """Write ``n`` scenes of ``split`` (one conversation of ≥ 2 rounds each) under ``out_dir``."""
    check_split_request(split, n, seed, max_rounds)
    out = Path(out_dir)
    files = SplitFiles(conversations=out / "conversations" / f"{DATASET_NAME}_{split}.json",
                       register=out / "annotations" / f"{DATASET_NAME}_{split}.json",
                       images_root=out / "images")
    (files.images_root / DATASET_NAME / split).mkdir(parents=True, exist_ok=True)
    files.conversations.parent.mkdir(parents=True, exist_ok=True)
    files.register.parent.mkdir(parents=True, exist_ok=True)
    entries, register = [], {}
    for index in range(n):
        record = scene_record(seed, split, index, max_rounds)
        (files.images_root / record.image).write_bytes(record.png)
        register.update({m: rle_encode(mask) for m, mask in record.masks.items()})
        entries.append(record.entry)
    files.conversations.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    files.register.write_text(register_text(register), encoding="utf-8")
    return files


def check_split_request(split: str, n: int, seed: int, max_rounds: int) -> None:
    """The arguments every split writer (JSON here, TFDS in ``tfds_sources``) accepts."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}.")
    if seed < 0 or n < 0 or max_rounds < 2:
        raise InputError(f"need seed >= 0, n >= 0 and max_rounds >= 2 (got {seed}, {n}, {max_rounds}).")


@dataclass(frozen=True, eq=False)
class SceneRecord:
    """What a split file set holds about one scene, in memory: one source for the JSON and TFDS writers."""

    entry: dict[str, Any]  # the conversation JSON entry
    image: str  # path relative to the images folder, as in the entry's placeholders
    png: bytes  # the image file
    masks: dict[str, np.ndarray]  # register mask id -> boolean [H, W] visible mask


def scene_record(seed: int, split: str, index: int, max_rounds: int = 6) -> SceneRecord:
    """Scene ``index`` of ``split`` as ``write_split`` writes it (ids, paths and PNG bytes included)."""
    scene, conversation = scene_and_conversation(seed, split, index, max_rounds)
    image = f"{DATASET_NAME}/{split}/{index:06d}.png"
    mask_ids = [f"{split}_{index:06d}_{i}" for i in range(len(scene.shapes))]
    png = io.BytesIO()
    Image.fromarray(scene.image).save(png, format="PNG")
    entry = conversation_to_json(conversation, image, mask_ids, f"{DATASET_NAME}_{split}_{index:06d}")
    return SceneRecord(entry=entry, image=image, png=png.getvalue(),
                       masks={m: scene.mask(i) for i, m in enumerate(mask_ids)})


def write_splits(out_dir: PathLike, sizes: Mapping[str, int], seed: int,
                 max_rounds: int = 6) -> dict[str, SplitFiles]:
    """``write_split`` for each ``{split: n}``; splits never share a scene (split is in the seed)."""
    return {split: write_split(out_dir, split, n, seed, max_rounds) for split, n in sizes.items()}


def scene_and_conversation(seed: int, split: str, index: int,
                           max_rounds: int = 6) -> tuple[Scene, Conversation]:
    """Regenerate in memory exactly what ``write_split`` wrote for scene ``index`` of ``split``."""
    return _scene_and_conversation(np.random.default_rng([seed, SPLITS.index(split), index]), max_rounds)


def _scene_and_conversation(rng: np.random.Generator, max_rounds: int) -> tuple[Scene, Conversation]:
    """Draw scenes until one supports at least two rounds (one referring round)."""
    while True:
        height, width = (int(v) for v in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
        scene = generate_scene(rng, (height, width))
        conversation = generate_conversation(scene, rng, max_rounds)
        if len(conversation.rounds) >= 2:
            return scene, conversation
