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

On disk (``write_split``), following spec §1.1/§6::

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
from typing import Any, Collection, Mapping, Sequence, Union

import numpy as np
from PIL import Image

from segllm_jax.data.conversations import (  # noqa: F401  (re-exported: the MR-Shapes API reads its JSON)
    DecodeTarget,
    MaskRef,
    parse_decode,
    parse_mask_ref,
    parse_placeholders,
    read_conversations,
)
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

# Margins that make superlatives unique for a human too, not only for arg-max.
_RATIO_MARGIN = 1.25  # nearest/farthest distances and largest/smallest areas differ by this factor
_POSITION_MARGIN = 0.05  # leftmost/...: centres differ by this fraction of the image side
_CONE = 1.25  # "left of": along-axis offset exceeds this times the cross-axis offset
_CONE_AMBIGUOUS = 0.8  # between this and _CONE a shape is neither in nor clearly out of the cone

EXTREMES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
REFERRING_RELATIONS = (
    "same_color", "same_kind", "touching", "nearest", "farthest",
    "left_of", "right_of", "above", "below",
)
_DIRECTIONS = {"left_of": (-1.0, 0.0), "right_of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}
_TEMPLATES = ("Segment {}.", "Please segment {}.", "Can you segment {}?", "Where is {}?", "Find {}.")

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
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (y1 > py) != (y2 > py)
        x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


@dataclass(frozen=True, eq=False)
class Scene:
    """An image, its instance map and the shapes in draw order (index = instance id)."""

    image: np.ndarray  # [H, W, 3] uint8
    instance_map: np.ndarray  # [H, W] int16: -1 background, i = shapes[i] visible there
    shapes: tuple[Shape, ...]

    def mask(self, index: int) -> np.ndarray:
        """Visible (post-occlusion) boolean mask of instance ``index``."""
        return self.instance_map == index

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
# Queries: what a round asks for, and the one function that answers it


@dataclass(frozen=True)
class Query:
    """A description of a target. ``relation`` is "direct" (round 1) or a ``REFERRING_RELATIONS``
    entry; ``kind``/``color`` restrict the candidates; ``extreme`` is for direct superlatives."""

    relation: str
    kind: str | None = None
    color: str | None = None
    extreme: str | None = None


def resolve(scene: Scene, query: Query, ref: int | None = None) -> int | None:
    """The unique instance ``query`` denotes (given reference instance ``ref``), or None.

    None means "no answer or not unique enough for a person": the generator only emits rounds whose
    answer this returns, and tests re-check every emitted round with it.
    """
    n = len(scene.shapes)
    cands = [i for i in range(n)
             if (query.kind is None or scene.shapes[i].kind == query.kind)
             and (query.color is None or scene.shapes[i].color == query.color)]
    if query.relation == "direct":
        if query.extreme is None:
            return cands[0] if len(cands) == 1 else None
        return _unique_extreme(scene, cands, query.extreme)
    if ref is None:
        raise ValueError(f"relation {query.relation!r} needs a reference instance")
    cands = [i for i in cands if i != ref]
    ref_shape = scene.shapes[ref]
    if query.relation == "same_color":
        same = [i for i in cands if scene.shapes[i].color == ref_shape.color]
        return same[0] if len(same) == 1 else None
    if query.relation == "same_kind":
        same = [i for i in cands if scene.shapes[i].kind == ref_shape.kind]
        return same[0] if len(same) == 1 else None
    if query.relation == "touching":
        touching = [i for i in cands if scene.adjacency[ref, i]]
        return _unique_by_ratio(touching, scene.areas[touching].astype(np.float64), largest=True)
    offsets = scene.centers[cands] - scene.centers[ref]  # [C, 2]
    dist = np.hypot(offsets[:, 0], offsets[:, 1])
    if query.relation in ("nearest", "farthest"):
        return _unique_by_ratio(cands, dist, largest=query.relation == "farthest")
    if query.relation in _DIRECTIONS:
        u = np.array(_DIRECTIONS[query.relation])
        along = offsets @ u
        across = np.abs(offsets @ np.array([-u[1], u[0]]))
        in_cone = along > _CONE * across
        # Shapes near the cone's edge may or may not count as "left of" for a person: they must
        # not compete with the answer, so they stay in the distance comparison.
        contenders = along > _CONE_AMBIGUOUS * across
        if not in_cone.any():
            return None
        best = int(np.argmin(np.where(in_cone, dist, np.inf)))
        rivals = dist[contenders & (np.arange(len(cands)) != best)]
        return cands[best] if np.all(rivals >= _RATIO_MARGIN * dist[best]) else None
    raise ValueError(f"unknown relation {query.relation!r}")


def _unique_by_ratio(cands: Sequence[int], values: np.ndarray, largest: bool) -> int | None:
    """The candidate whose value beats every other by ``_RATIO_MARGIN`` (a lone candidate wins)."""
    if len(cands) == 0:
        return None
    order = np.argsort(-values if largest else values, kind="stable")
    if len(cands) > 1:
        best, second = values[order[0]], values[order[1]]
        if (best < _RATIO_MARGIN * second) if largest else (second < _RATIO_MARGIN * best):
            return None
    return cands[int(order[0])]


def _unique_extreme(scene: Scene, cands: Sequence[int], extreme: str) -> int | None:
    """Superlative over at least two candidates ("the largest star" needs a second star)."""
    if len(cands) < 2:
        return None
    if extreme in ("largest", "smallest"):
        return _unique_by_ratio(cands, scene.areas[list(cands)].astype(np.float64),
                                largest=extreme == "largest")
    axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[extreme]
    key = sign * scene.centers[list(cands), axis]  # smaller is more extreme
    order = np.argsort(key, kind="stable")
    margin = _POSITION_MARGIN * min(scene.image.shape[:2])
    return cands[int(order[0])] if key[order[1]] - key[order[0]] >= margin else None


def answers_by_reference(scene: Scene, query: Query) -> dict[int, int | None]:
    """What a referring query answers for every possible reference instance of the scene."""
    return {r: resolve(scene, query, r) for r in range(len(scene.shapes))}


def depends_on_reference(scene: Scene, query: Query, ref: int) -> bool:
    """True iff ``query`` has a unique answer for ``ref`` and another instance as reference would
    give a different defined answer, i.e. the question alone (without the mask memory) is ambiguous."""
    target = resolve(scene, query, ref)
    return target is not None and any(
        a is not None and a != target for a in answers_by_reference(scene, query).values())


def describe(query: Query, ref_round: int | None = None) -> str:
    """English noun phrase; earlier answers are named "instance k" (k = 1-based round)."""
    noun = " ".join(w for w in (query.color, query.kind or "shape") if w)
    if query.relation == "direct":
        return f"the {query.extreme} {noun}" if query.extreme else f"the {noun}"
    inst = f"instance {ref_round + 1}"
    phrases = {
        "same_color": f"the other {noun} with the same color as {inst}",
        "same_kind": f"the other {noun} of the same type as {inst}",
        "touching": f"the largest {noun} touching {inst}",
        "nearest": f"the {noun} nearest to {inst}",
        "farthest": f"the {noun} farthest from {inst}",
        "left_of": f"the nearest {noun} to the left of {inst}",
        "right_of": f"the nearest {noun} to the right of {inst}",
        "above": f"the nearest {noun} above {inst}",
        "below": f"the nearest {noun} below {inst}",
    }
    return phrases[query.relation]


# ----------------------------------------------------------------------------------------------
# Conversations


@dataclass(frozen=True)
class Round:
    """One question/answer round. ``ref_round`` is the 0-based index of the earlier round whose
    answer the question is about (None in round 1)."""

    query: Query
    target: int  # instance index of the answer
    ref_round: int | None
    question: str  # text as written to the JSON; earlier answers appear as "instance k"

    @property
    def tagged_question(self) -> str:
        """The question in the inference CLI/session form, with the reference as ``[REF:k]``."""
        return self.question if self.ref_round is None else f"{self.question}[REF:{self.ref_round + 1}]"


@dataclass(frozen=True)
class Conversation:
    rounds: tuple[Round, ...]

    def reference_instance(self, round_index: int) -> int | None:
        """Instance index a round refers to (the answer of its ``ref_round``)."""
        ref = self.rounds[round_index].ref_round
        return None if ref is None else self.rounds[ref].target


def _direct_options(scene: Scene) -> list[tuple[Query, int]]:
    kinds = sorted({s.kind for s in scene.shapes})
    colors = sorted({s.color for s in scene.shapes})
    filters = [(None, None)] + [(k, None) for k in kinds] + [(None, c) for c in colors] + \
              [(k, c) for k in kinds for c in colors]
    options = []
    for kind, color in filters:
        for extreme in (None,) + EXTREMES:
            if kind is None and color is None and extreme is None:
                continue  # "the shape" is never unique with 3+ shapes
            query = Query("direct", kind=kind, color=color, extreme=extreme)
            target = resolve(scene, query)
            if target is not None:
                options.append((query, target))
    return options


def _referring_options(scene: Scene, references: Sequence[int],
                       exclude: Collection[int] = ()) -> dict[str, list[tuple[int, Query, int]]]:
    """Valid (index into ``references``, query, target) per relation: unique, reference-dependent, and a
    target outside ``exclude``. ``references`` are instance indices (a conversation's earlier answers)."""
    kinds = sorted({s.kind for s in scene.shapes})
    colors = sorted({s.color for s in scene.shapes})
    options: dict[str, list[tuple[int, Query, int]]] = {}
    for relation in REFERRING_RELATIONS:
        filters = [(None, None)]
        if relation != "same_kind":
            filters += [(k, None) for k in kinds]
        if relation != "same_color":
            filters += [(None, c) for c in colors]
        for position, ref in enumerate(references):
            for kind, color in filters:
                query = Query(relation, kind=kind, color=color)
                target = resolve(scene, query, ref)
                if target is not None and target not in exclude and depends_on_reference(scene, query, ref):
                    options.setdefault(relation, []).append((position, query, target))
    return options


def generate_conversation(scene: Scene, rng: np.random.Generator, max_rounds: int = 6) -> Conversation:
    """A conversation of 1..``max_rounds`` rounds (length drawn in [2, max_rounds] and cut short when
    no valid referring round remains). Rounds ≥ 2 each refer to one earlier answer and have a new,
    reference-dependent target. Empty only if no shape of the scene can be named uniquely."""
    if max_rounds < 1:
        raise InputError(f"max_rounds must be at least 1, got {max_rounds}.")
    n_rounds = int(rng.integers(min(2, max_rounds), max_rounds + 1))
    direct = _direct_options(scene)
    if not direct:
        return Conversation(rounds=())
    query, target = direct[int(rng.integers(len(direct)))]
    rounds = [Round(query, target, None, _question(rng, describe(query)))]
    while len(rounds) < n_rounds:
        answered = [r.target for r in rounds]
        options = _referring_options(scene, answered, set(answered))
        if not options:
            break
        relation = sorted(options)[int(rng.integers(len(options)))]
        ref_round, query, target = options[relation][int(rng.integers(len(options[relation])))]
        rounds.append(Round(query, target, ref_round, _question(rng, describe(query, ref_round))))
    return Conversation(rounds=tuple(rounds))


def question_type(question: str, task_type: str | None) -> str:
    """A round's question type for per-type metrics: the relation of a referring round (its MASK-DECODE
    task type), else "superlative" or "attribute" for a direct question (by its extreme word)."""
    if task_type:
        return task_type
    words = set(question.lower().replace("?", " ").replace(".", " ").split())
    return "superlative" if words & set(EXTREMES) else "attribute"


def vocabulary_text() -> str:
    """Every word a generated question can contain, once (a tokenizer trained on a few scenes must
    still know the colour, kind and relation words those scenes happened not to use)."""
    queries = [Query("direct", kind=k, color=c, extreme=e) for k in (*KINDS, None) for c in (*PALETTE, None)
               for e in (*EXTREMES, None)]
    queries += [Query(r) for r in REFERRING_RELATIONS]
    phrases = [describe(q, ref_round=8) for q in queries] + [f"instance {k}" for k in range(1, 10)]
    return " ".join(t.format(p) for t in _TEMPLATES for p in phrases[:1]) + " " + " ".join(phrases)


def _question(rng: np.random.Generator, noun_phrase: str) -> str:
    return _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(noun_phrase)


# ----------------------------------------------------------------------------------------------
# COCO uncompressed RLE


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a 2-D mask: column-major runs, starting with a (maybe empty) 0-run."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise InputError(f"an RLE mask must be 2-D, got shape {mask.shape}.")
    flat = mask.ravel(order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    if flat[0]:
        runs = np.concatenate([[0], runs])
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in runs]}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Boolean [H, W] mask from COCO uncompressed RLE (compressed string counts are not supported)."""
    height, width = (int(v) for v in rle["size"])
    if isinstance(rle["counts"], (str, bytes)):
        raise InputError("compressed RLE (string counts) is not supported; store uncompressed counts lists.")
    counts = np.asarray(rle["counts"], np.int64)
    if np.any(counts < 0) or counts.sum() != height * width:
        raise InputError(f"RLE counts sum to {counts.sum()} but size is {height}x{width}; "
                         "the register is corrupt.")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")


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
# Conversation JSON (spec §1.1): writing (parsing lives in segllm_jax.data.conversations)


def conversation_to_json(conversation: Conversation, image: str, mask_ids: Sequence[str],
                         conv_id: str) -> dict[str, Any]:
    """One released-format entry. ``image`` is relative to the images folder; ``mask_ids[i]`` is the
    register id of instance i. Referring rounds use the one-reference MASK-DECODE payload
    ``task_type:ref_id:tgt_id:img:dataset`` with the relation as task type."""
    turns = []
    for r in conversation.rounds:
        target = mask_ids[r.target]
        if r.ref_round is None:
            human = f"[IMAGE256:{image}] {r.question}"
            gpt = f"[MASK-DECODE:{image}|{DATASET_NAME}|{target}]"
        else:
            ref = mask_ids[conversation.rounds[r.ref_round].target]
            human = (f"[MASK-ENCODE:{image}|{DATASET_NAME}|{ref}]"
                     f"[BOX-ENCODE:{image}|{DATASET_NAME}|{ref}]{r.question}")
            gpt = f"[MASK-DECODE:{r.query.relation}:{ref}:{target}:{image}:{DATASET_NAME}]"
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return {"id": conv_id, "task": "segmentation", "conversations": turns}


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
    files.register.write_text(json.dumps(register, separators=(",", ":")) + "\n", encoding="utf-8")
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
