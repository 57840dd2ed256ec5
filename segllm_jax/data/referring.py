"""Referring questions about the instances of one image: what a question denotes, whether its answer
is unique, whether it needs its reference, and multi-round conversations built from such questions.

Why a module of its own: MR-Shapes (generated scenes, :mod:`segllm_jax.data.mrshapes`) and
conversations from a user's COCO annotations (:mod:`segllm_jax.data.coco_conversations`) ask the same
kinds of questions, and a round is only worth training on if it is answerable: its answer is unique
for a person, not just an arg-max tie broken by index, and a round that names an earlier answer
*depends* on it (asking the same question about some other instance gives a different, defined
answer), so a model that ignores the mask memory cannot answer it. Both generators therefore share
one definition of each relation, its margins and its uniqueness test.

The instances of an image are described by a :class:`Layout`: a noun (``kinds``: MR-Shapes' shape
kind, COCO's category name) and optional colour per instance, visible areas, centres and contact.
Round 1 names an instance directly ("the red circle", "the largest dog", or a human-written
referring expression); every later round names its target relative to an earlier answer ("the dog
nearest to instance 1"), which the conversation JSON refers to through [REF] placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Protocol, Sequence

import numpy as np

from segllm_jax.data.conversations import DecodeTarget, conversation_entry, format_round
from segllm_jax.errors import InputError

# Margins that make superlatives unique for a human too, not only for arg-max.
_RATIO_MARGIN = 1.25  # nearest/farthest distances and largest/smallest areas differ by this factor
_POSITION_MARGIN = 0.05  # leftmost/...: centres differ by this fraction of the image side
_CONE = 1.25  # "left of": along-axis offset exceeds this times the cross-axis offset
_CONE_AMBIGUOUS = 0.8  # between this and _CONE an instance is neither in nor clearly out of the cone

EXTREMES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
REFERRING_RELATIONS = (
    "same_color", "same_kind", "touching", "nearest", "farthest",
    "left_of", "right_of", "above", "below",
)
#: Round 1 named by a human-written expression (RefCOCO-style ``refs``), not by :func:`resolve`.
EXPRESSION = "expression"
_DIRECTIONS = {"left_of": (-1.0, 0.0), "right_of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}
TEMPLATES = ("Segment {}.", "Please segment {}.", "Can you segment {}?", "Where is {}?", "Find {}.")


class Layout(Protocol):
    """What the questions can see of an image's N instances (index = instance id)."""

    @property
    def kinds(self) -> Sequence[str]:
        """[N] the noun naming each instance ("circle", "dog")."""

    @property
    def colors(self) -> Sequence[str | None]:
        """[N] a colour word, or None where the data has none (every COCO instance)."""

    @property
    def areas(self) -> np.ndarray:
        """[N] visible pixel counts."""

    @property
    def centers(self) -> np.ndarray:
        """[N, 2] (x, y) in pixels, x to the right, y down: where a person would point."""

    @property
    def adjacency(self) -> np.ndarray:
        """[N, N] bool: the visible masks touch."""

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the image."""


# ----------------------------------------------------------------------------------------------
# Queries: what a round asks for, and the one function that answers it


@dataclass(frozen=True)
class Query:
    """A description of a target. ``relation`` is "direct" (round 1), :data:`EXPRESSION` (round 1, the
    human-written ``expression``) or a ``REFERRING_RELATIONS`` entry; ``kind``/``color`` restrict the
    candidates; ``extreme`` is for direct superlatives."""

    relation: str
    kind: str | None = None
    color: str | None = None
    extreme: str | None = None
    expression: str | None = None


def resolve(layout: Layout, query: Query, ref: int | None = None) -> int | None:
    """The unique instance ``query`` denotes (given reference instance ``ref``), or None.

    None means "no answer or not unique enough for a person": the generators only emit rounds whose
    answer this returns, and tests re-check every emitted round with it.
    """
    n = len(layout.kinds)
    cands = [i for i in range(n)
             if (query.kind is None or layout.kinds[i] == query.kind)
             and (query.color is None or layout.colors[i] == query.color)]
    if query.relation == "direct":
        if query.extreme is None:
            return cands[0] if len(cands) == 1 else None
        return _unique_extreme(layout, cands, query.extreme)
    if query.relation == EXPRESSION:
        raise ValueError("a human-written expression names its target itself; there is nothing to resolve")
    if ref is None:
        raise ValueError(f"relation {query.relation!r} needs a reference instance")
    cands = [i for i in cands if i != ref]
    if query.relation == "same_color":
        same = [i for i in cands if layout.colors[i] == layout.colors[ref]]
        return same[0] if len(same) == 1 else None
    if query.relation == "same_kind":
        same = [i for i in cands if layout.kinds[i] == layout.kinds[ref]]
        return same[0] if len(same) == 1 else None
    if query.relation == "touching":
        touching = [i for i in cands if layout.adjacency[ref, i]]
        return _unique_by_ratio(touching, layout.areas[touching].astype(np.float64), largest=True)
    offsets = layout.centers[cands] - layout.centers[ref]  # [C, 2]
    dist = np.hypot(offsets[:, 0], offsets[:, 1])
    if query.relation in ("nearest", "farthest"):
        return _unique_by_ratio(cands, dist, largest=query.relation == "farthest")
    if query.relation in _DIRECTIONS:
        u = np.array(_DIRECTIONS[query.relation])
        along = offsets @ u
        across = np.abs(offsets @ np.array([-u[1], u[0]]))
        in_cone = along > _CONE * across
        # Instances near the cone's edge may or may not count as "left of" for a person: they must
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


def _unique_extreme(layout: Layout, cands: Sequence[int], extreme: str) -> int | None:
    """Superlative over at least two candidates ("the largest star" needs a second star)."""
    if len(cands) < 2:
        return None
    if extreme in ("largest", "smallest"):
        return _unique_by_ratio(cands, layout.areas[list(cands)].astype(np.float64),
                                largest=extreme == "largest")
    axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[extreme]
    key = sign * layout.centers[list(cands), axis]  # smaller is more extreme
    order = np.argsort(key, kind="stable")
    margin = _POSITION_MARGIN * min(layout.image_hw)
    return cands[int(order[0])] if key[order[1]] - key[order[0]] >= margin else None


def answers_by_reference(layout: Layout, query: Query) -> dict[int, int | None]:
    """What a referring query answers for every possible reference instance of the image."""
    return {r: resolve(layout, query, r) for r in range(len(layout.kinds))}


def depends_on_reference(layout: Layout, query: Query, ref: int) -> bool:
    """True iff ``query`` has a unique answer for ``ref`` and another instance as reference would
    give a different defined answer, i.e. the question alone (without the mask memory) is ambiguous."""
    target = resolve(layout, query, ref)
    return target is not None and any(
        a is not None and a != target for a in answers_by_reference(layout, query).values())


def describe(query: Query, ref_round: int | None = None, default_noun: str = "shape") -> str:
    """English noun phrase; earlier answers are named "instance k" (k = 1-based round).
    ``default_noun`` names an instance when the query does not restrict the kind."""
    if query.relation == EXPRESSION:
        return str(query.expression)
    noun = " ".join(w for w in (query.color, query.kind or default_noun) if w)
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


def question(rng: np.random.Generator, noun_phrase: str) -> str:
    """A question around ``noun_phrase`` in one of :data:`TEMPLATES` (one draw from ``rng``)."""
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(noun_phrase)


def question_type(question: str, task_type: str | None) -> str:
    """A round's question type for per-type metrics: the relation of a referring round (its MASK-DECODE
    task type), else "superlative" or "attribute" for a direct question (by its extreme word)."""
    if task_type:
        return task_type
    words = set(question.lower().replace("?", " ").replace(".", " ").split())
    return "superlative" if words & set(EXTREMES) else "attribute"


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


@dataclass(frozen=True)
class ConversationRules:
    """What a data set's conversations may ask (MR-Shapes' defaults).

    ``relations`` drops relations the data cannot support (COCO has no colours, so no "same color");
    ``default_noun`` names an instance of unrestricted kind ("the largest shape" / "object");
    ``expression_share`` is how often round 1 uses a human-written expression when there is one."""

    min_rounds: int = 2
    relations: tuple[str, ...] = REFERRING_RELATIONS
    default_noun: str = "shape"
    expression_share: float = 0.5


def direct_options(layout: Layout, eligible: Collection[int] | None = None) -> list[tuple[Query, int]]:
    """Every unique round-1 ``(query, target)``: by kind, colour, both, and superlatives of each;
    targets restricted to ``eligible`` (None: all). Ineligible instances still compete for uniqueness."""
    kinds = sorted(set(layout.kinds))
    colors = sorted({c for c in layout.colors if c is not None})
    filters = [(None, None)] + [(k, None) for k in kinds] + [(None, c) for c in colors] + \
              [(k, c) for k in kinds for c in colors]
    options = []
    for kind, color in filters:
        for extreme in (None,) + EXTREMES:
            if kind is None and color is None and extreme is None:
                continue  # "the shape" is never unique with 2+ instances
            query = Query("direct", kind=kind, color=color, extreme=extreme)
            target = resolve(layout, query)
            if target is not None and (eligible is None or target in eligible):
                options.append((query, target))
    return options


def referring_options(layout: Layout, references: Sequence[int], exclude: Collection[int] = (),
                      relations: Sequence[str] = REFERRING_RELATIONS) -> dict[str, list[tuple[int, Query, int]]]:
    """Valid (index into ``references``, query, target) per relation: unique, reference-dependent, and a
    target outside ``exclude``. ``references`` are instance indices (a conversation's earlier answers)."""
    kinds = sorted(set(layout.kinds))
    colors = sorted({c for c in layout.colors if c is not None})
    options: dict[str, list[tuple[int, Query, int]]] = {}
    for relation in relations:
        filters = [(None, None)]
        if relation != "same_kind":
            filters += [(k, None) for k in kinds]
        if relation != "same_color":
            filters += [(None, c) for c in colors]
        for position, ref in enumerate(references):
            for kind, color in filters:
                query = Query(relation, kind=kind, color=color)
                target = resolve(layout, query, ref)
                if target is not None and target not in exclude and depends_on_reference(layout, query, ref):
                    options.setdefault(relation, []).append((position, query, target))
    return options


def generate_conversation(layout: Layout, rng: np.random.Generator, max_rounds: int = 6,
                          rules: ConversationRules = ConversationRules(), eligible: Collection[int] | None = None,
                          expressions: Sequence[tuple[Query, int]] = ()) -> Conversation:
    """A conversation of 1..``max_rounds`` rounds (length drawn in [``rules.min_rounds``, max_rounds] and
    cut short when no valid referring round remains). Rounds ≥ 2 each refer to one earlier answer and
    have a new, reference-dependent target; every target is in ``eligible`` (None: any instance).
    ``expressions`` are extra round-1 options ``(Query(EXPRESSION, ...), target)``. Empty only if no
    eligible instance can be named uniquely."""
    if max_rounds < 1:
        raise InputError(f"max_rounds must be at least 1, got {max_rounds}.")
    n_rounds = int(rng.integers(min(rules.min_rounds, max_rounds), max_rounds + 1))
    direct = direct_options(layout, eligible)
    # draws only when there are expressions, so MR-Shapes' random stream (and files) stay as they were
    if expressions and (not direct or rng.random() < rules.expression_share):
        direct = list(expressions)
    if not direct:
        return Conversation(rounds=())
    query, target = direct[int(rng.integers(len(direct)))]
    rounds = [Round(query, target, None, question(rng, describe(query, default_noun=rules.default_noun)))]
    while len(rounds) < n_rounds:
        answered = [r.target for r in rounds]
        excluded = set(answered) | (set() if eligible is None else set(range(len(layout.kinds))) - set(eligible))
        options = referring_options(layout, answered, excluded, rules.relations)
        if not options:
            break
        relation = sorted(options)[int(rng.integers(len(options)))]
        ref_round, query, target = options[relation][int(rng.integers(len(options[relation])))]
        phrase = describe(query, ref_round, default_noun=rules.default_noun)
        rounds.append(Round(query, target, ref_round, question(rng, phrase)))
    return Conversation(rounds=tuple(rounds))


def conversation_to_json(conversation: Conversation, image: str, dataset: str, mask_ids: Sequence[str],
                         conv_id: str) -> dict[str, Any]:
    """One released-format entry. ``image`` is relative to the images folder; ``mask_ids[i]`` is the
    register id of instance i. Referring rounds use the one-reference MASK-DECODE payload
    ``task_type:ref_id:tgt_id:img:dataset`` with the relation as task type."""
    turns = []
    for k, r in enumerate(conversation.rounds):
        ref = conversation.reference_instance(k)
        refs = () if ref is None else (mask_ids[ref],)
        target = DecodeTarget(image, dataset, mask_ids[r.target], refs, None if ref is None else r.query.relation)
        turns += format_round(r.question, target, opens_image=k == 0)
    return conversation_entry(conv_id, turns)
