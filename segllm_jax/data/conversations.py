"""The released SegLLM conversation JSON (architecture.md §D1): placeholders, payloads and rounds.

A conversation file is a JSON list of ``{"id", "task": "segmentation", "conversations": [...]}``
entries whose turns alternate human/gpt. Multimodal content sits in bracket placeholders:

* ``[IMAGE256:img]`` opens round 1 (256 image tokens),
* ``[MASK-ENCODE:img|dataset|mask_id][BOX-ENCODE:img|dataset|mask_id]`` pairs open a referring round
  (one pair per reference, two ``<video>`` tokens),
* ``[MASK-DECODE:...]`` is the whole gpt turn (one ``<seg>``), in one of three payload forms.

The original replaced brackets in place and tokenized the resulting string; the port builds the
prompt structurally (``segllm_jax.prompt.ConversationEncoder``), so a turn is accepted only if it
has the structure that makes both identical: placeholders before the question, encode placeholders
in (mask, box) pairs of one mask, and a gpt turn that is exactly one MASK-DECODE. Anything else raises
:class:`InputError`, which the input pipeline counts and skips.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from segllm_jax import preprocess
from segllm_jax.errors import InputError
from segllm_jax.prompt import Round

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

PLACEHOLDER_KINDS = ("IMAGE256", "MASK-ENCODE", "BOX-ENCODE", "MASK-DECODE")
#: Dataset name of conversations built at inference time: no annotation exists, so the original
#: fed dummies (full-image CLIP crop, zero box, all-ones target; §D1, §D6).
INFERENCE_DATASET = "INFERENCE"

_BRACKET = re.compile(r"\[([^\]]+)\]")
_LEADING = re.compile(r"\s*\[(IMAGE256|MASK-ENCODE|BOX-ENCODE):([^\]]*)\]")


@dataclass(frozen=True)
class Placeholder:
    kind: str  # one of PLACEHOLDER_KINDS
    payload: str  # text after the first ':'


@dataclass(frozen=True)
class MaskRef:
    """A MASK-ENCODE/BOX-ENCODE payload ``img|dataset|mask_id``."""

    image: str
    dataset: str
    mask_id: str


@dataclass(frozen=True)
class DecodeTarget:
    """A MASK-DECODE payload in any of its three forms (§D1)."""

    image: str
    dataset: str
    target_id: str
    ref_ids: tuple[str, ...] = ()  # the original uses only ref_ids[0]
    task_type: str | None = None

    @property
    def supervised_ref_id(self) -> str | None:
        """The reference whose mask HIPIE must also find (§T1); only the first one counts (§O26)."""
        return self.ref_ids[0] if self.ref_ids else None


def parse_placeholders(value: str) -> tuple[list[Placeholder], str]:
    """The placeholders of one turn in text order, and the remaining text (stripped).

    Brackets of other kinds stay in the text, as in the original loader, which also printed a
    warning for them (logged here).
    """
    found: list[Placeholder] = []

    def take(match: re.Match[str]) -> str:
        kind, sep, payload = match.group(1).partition(":")
        if kind not in PLACEHOLDER_KINDS or not sep:
            log.warning("Ignoring bracket %s (not one of %s); it stays in the text.",
                        match.group(0), ", ".join(PLACEHOLDER_KINDS))
            return match.group(0)
        found.append(Placeholder(kind, payload))
        return ""

    text = _BRACKET.sub(take, value)
    return found, text.strip()


def parse_mask_ref(payload: str) -> MaskRef:
    parts = payload.split("|")
    if len(parts) != 3:
        raise InputError(f"mask reference {payload!r} is not of the form img|dataset|mask_id.")
    return MaskRef(*parts)


def parse_decode(payload: str) -> DecodeTarget:
    """``img|dataset|tgt``, ``task:ref:tgt:img:dataset`` or ``task:ref:ref2:tgt:img:dataset``."""
    colons = payload.count(":")
    if colons in (4, 5):
        task, *ids, image, dataset = payload.split(":")
        return DecodeTarget(image, dataset, ids[-1], tuple(ids[:-1]), task)
    if colons == 0 and payload.count("|") == 2:
        image, dataset, target = payload.split("|")
        return DecodeTarget(image, dataset, target)
    raise InputError(f"MASK-DECODE payload {payload!r} matches none of the three forms of docs/architecture.md §D1.")


def format_round(question: str, target: DecodeTarget, opens_image: bool = False) -> list[dict[str, str]]:
    """The (human, gpt) turns of one round, the form :func:`parse_conversation` reads back: the image
    placeholder if the round opens the conversation, one (MASK-ENCODE, BOX-ENCODE) pair per reference in
    ``target.ref_ids``, the question; the gpt turn is the one MASK-DECODE (task form when referring)."""
    human = f"[IMAGE256:{target.image}] " if opens_image else ""
    for ref in target.ref_ids:
        where = f"{target.image}|{target.dataset}|{ref}"
        human += f"[MASK-ENCODE:{where}][BOX-ENCODE:{where}]"
    if target.ref_ids:
        if not target.task_type or len(target.ref_ids) > 2:
            raise ValueError("a referring MASK-DECODE needs a task type and one or two references")
        payload = ":".join((target.task_type, *target.ref_ids, target.target_id, target.image, target.dataset))
    else:
        payload = f"{target.image}|{target.dataset}|{target.target_id}"
    return [{"from": "human", "value": human + question}, {"from": "gpt", "value": f"[MASK-DECODE:{payload}]"}]


def conversation_entry(conv_id: str, turns: Sequence[dict[str, str]]) -> dict[str, Any]:
    """One entry of a conversation file (§D1)."""
    return {"id": conv_id, "task": "segmentation", "conversations": list(turns)}


def read_conversations(path: PathLike) -> list[dict[str, Any]]:
    """Entries of a conversation JSON file, checked to be alternating human/gpt turns."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise InputError(f"{path} must hold a JSON list of conversations.")
    for entry in entries:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not turns or len(turns) % 2 or any(
                t.get("from") != ("human", "gpt")[i % 2] for i, t in enumerate(turns)):
            raise InputError(f"{path}: entry {entry.get('id') if isinstance(entry, dict) else entry!r} "
                             "must have alternating human/gpt turns starting with human.")
    return entries


# ----------------------------------------------------------------------------------------------
# Rounds


@dataclass(frozen=True)
class ParsedRound:
    """One question/answer round: what the tokenizer needs and which masks the pipeline loads."""

    question: str
    image: str | None  # IMAGE256 payload if the round opens with the image
    references: tuple[MaskRef, ...]  # one per (MASK-ENCODE, BOX-ENCODE) pair, in order
    target: DecodeTarget

    def tokenizer_round(self) -> Round:
        return Round(self.question, num_refs=len(self.references), has_image=self.image is not None)


@dataclass(frozen=True)
class ParsedConversation:
    conv_id: str | None
    rounds: tuple[ParsedRound, ...]

    @property
    def image(self) -> str:
        """The one image every placeholder of the conversation points at (checked by the parser)."""
        return self.rounds[0].target.image

    def tokenizer_rounds(self) -> list[Round]:
        return [r.tokenizer_round() for r in self.rounds]


def parse_conversation(entry: dict[str, Any], limit_rounds: int | None = None) -> ParsedConversation:
    """Rounds of one JSON entry, truncated to ``limit_rounds`` (the original's ``--limit_rounds``).

    Raises :class:`InputError` for entries whose structure the structural encoder cannot reproduce,
    or whose placeholders name more than one image (the model takes one image per conversation).
    """
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not turns or len(turns) % 2:
        raise InputError(f"conversation {entry.get('id') if isinstance(entry, dict) else entry!r} "
                         "needs an even, non-zero number of turns.")
    if limit_rounds is not None:
        if limit_rounds < 1:
            raise InputError(f"limit_rounds must be at least 1, got {limit_rounds}.")
        turns = turns[: 2 * limit_rounds]
    conv_id = entry.get("id")
    rounds = []
    for k in range(0, len(turns), 2):
        human, gpt = turns[k], turns[k + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise InputError(f"conversation {conv_id!r}: turns must alternate human/gpt.")
        rounds.append(_parse_round(str(human.get("value", "")), str(gpt.get("value", "")), conv_id))
    conversation = ParsedConversation(conv_id, tuple(rounds))
    _check_single_image(conversation)
    return conversation


def _parse_round(human: str, gpt: str, conv_id: Any) -> ParsedRound:
    placeholders, question = _leading_placeholders(human, conv_id)
    image = None
    if placeholders and placeholders[0].kind == "IMAGE256":
        image = placeholders.pop(0).payload
    references = _reference_pairs(placeholders, conv_id)
    decode, rest = parse_placeholders(gpt)
    if len(decode) != 1 or decode[0].kind != "MASK-DECODE" or rest:
        raise InputError(f"conversation {conv_id!r}: a gpt turn must be exactly one MASK-DECODE bracket, "
                         f"got {gpt!r}.")
    return ParsedRound(question, image, references, parse_decode(decode[0].payload))


def _leading_placeholders(human: str, conv_id: Any) -> tuple[list[Placeholder], str]:
    """Placeholders opening a human turn, and the question after them.

    The encoder emits placeholder tokens before the question (§D1), so a placeholder inside
    or after the question text (or a MASK-DECODE in a human turn) cannot be reproduced.
    """
    found, pos = [], 0
    while match := _LEADING.match(human, pos):
        found.append(Placeholder(match.group(1), match.group(2)))
        pos = match.end()
    later, question = parse_placeholders(human[pos:])
    if later:
        raise InputError(f"conversation {conv_id!r}: placeholders must open the human turn, before the "
                         f"question ({human!r}).")
    return found, question


def _reference_pairs(placeholders: Sequence[Placeholder], conv_id: Any) -> tuple[MaskRef, ...]:
    """(MASK-ENCODE, BOX-ENCODE) pairs of one mask each, as the encoder lays out reference tokens."""
    kinds = [p.kind for p in placeholders]
    if kinds != ["MASK-ENCODE", "BOX-ENCODE"] * (len(kinds) // 2) or len(kinds) % 2:
        raise InputError(f"conversation {conv_id!r}: reference placeholders must be MASK-ENCODE/BOX-ENCODE "
                         f"pairs (after an optional leading IMAGE256), got {kinds}.")
    refs = []
    for mask, box in zip(placeholders[::2], placeholders[1::2], strict=True):
        if mask.payload != box.payload:
            raise InputError(f"conversation {conv_id!r}: MASK-ENCODE {mask.payload!r} and BOX-ENCODE "
                             f"{box.payload!r} of one reference must name the same mask.")
        refs.append(parse_mask_ref(mask.payload))
    return tuple(refs)


def _check_single_image(conversation: ParsedConversation) -> None:
    rounds = conversation.rounds
    images = {r.target.image for r in rounds} | {r.image for r in rounds if r.image is not None} | \
        {ref.image for r in rounds for ref in r.references}
    if len(images) != 1:
        raise InputError(f"conversation {conversation.conv_id!r} names several images {sorted(images)}; "
                         "SegLLM conversations are about one image.")
    if rounds[0].image is None:
        raise InputError(f"conversation {conversation.conv_id!r}: round 1 must open with [IMAGE256:...].")


def read_rgb(source: Path | bytes) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of a dataset image (file or its bytes), without EXIF rotation (annotations
    index the stored grid)."""
    return np.asarray(preprocess.load_image(source, exif_transpose=False))


@dataclass(frozen=True, eq=False)
class EmbeddedConversation:
    """A conversation entry that carries its image and masks (a TFDS record): building it reads no
    image file and no annotation register; its placeholders' mask ids are keys of ``masks``."""

    entry: dict[str, Any]  # the conversation JSON entry (§D1)
    image: bytes  # the encoded image file
    masks: Mapping[str, np.ndarray]  # mask id -> boolean [H, W] at the image's resolution

    def mask(self, mask_id: str) -> np.ndarray:
        if mask_id not in self.masks:
            raise InputError(f"mask id {mask_id!r} is not in the record of conversation {self.entry.get('id')!r}.")
        return self.masks[mask_id]
