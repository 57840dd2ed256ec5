"""SegLLM's prompts: conversation rounds -> token ids, LM labels and where every round's tokens sit.

Text becomes token ids here and nowhere else (through :class:`~segllm_jax.tokenizer.SegTokenizer`).

SegLLM prompts follow LLaVA's ``vicuna_v1`` template (architecture.md §D3)::

    <s>SYSTEM USER: <video>×N {q1} ASSISTANT: <seg></s>USER: <video><video>{q2} ASSISTANT: <seg></s>...

The original builds that string and tokenizes it in one call, then re-derives the label mask from
token-count arithmetic that only works for one tokenizer behaviour (architecture.md §O25). Here the prompt
is built from parts instead: every text piece is tokenized *in context*, i.e. together with the added
tokens that surround it, and the surrounding ids are cut off again. Added tokens are atomic for HF
tokenizers, so SentencePiece never merges across them; what a piece's tokens do depend on is whether the
piece starts the string (the ``▁`` word-boundary marker is prepended only there for LLaMA's
``prepend_scheme="first"``) and whether a neighbouring added token strips spaces. Tokenizing in context
reproduces both, so the concatenation equals whole-string tokenization for any HF tokenizer, and labels
and ``<video>``/``<seg>`` positions fall out of the structure rather than being searched for.

Deliberate differences from the original:

* Labels supervise each round's ``▁``, ``<seg>`` and closing ``</s>``. The original's arithmetic (with
  the non-legacy tokenizer it ran on) shifts each later round's window back by one token, so it
  supervises only the *last* ``</s>`` and masks the others; with legacy spacing its counts never match
  and it drops all labels.
* A conversation longer than the model's limit raises :class:`InputError` instead of being truncated.
* Several ``[REF:k]`` tags per query are accepted (the original CLI kept the first).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from segllm_jax.errors import ConfigError, InputError
from segllm_jax.tokenizer import SegTokenizer

#: Label value that the LM loss ignores (PyTorch's cross-entropy default, kept for compatibility).
IGNORE_INDEX = -100

#: Number of ``<video>`` placeholders that carry the CLIP patch features of the image (16×16 patches).
DEFAULT_NUM_IMAGE_TOKENS = 256

#: The vicuna_v1 system prompt; part of the trained prompt, so it must stay byte-identical.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"


@dataclasses.dataclass(frozen=True)
class Round:
    """One user turn plus its ``<seg>`` answer.

    ``num_refs`` reference pairs (mask-encode, box-encode) precede the question; ``has_image`` puts the
    image placeholders first (the original does this in round 1 only).
    """

    question: str
    num_refs: int = 0
    has_image: bool = False


@dataclasses.dataclass(frozen=True)
class RoundLayout:
    """Where one round's tokens sit in the conversation's ``input_ids`` (absolute positions)."""

    start: int  #: first token of the round (BOS for round 1)
    end: int  #: one past the round's closing ``</s>``
    image_positions: np.ndarray  #: (num_image_tokens,) or (0,), patch order
    mask_encode_positions: np.ndarray  #: (num_refs,), reference order
    box_encode_positions: np.ndarray  #: (num_refs,), reference order
    seg_position: int  #: the ``<seg>``; the mask query is the hidden state one position earlier


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    """Token ids, LM labels and layout of a multi-round conversation."""

    input_ids: np.ndarray  #: int32 (T,)
    labels: np.ndarray  #: int32 (T,), IGNORE_INDEX except assistant-emitted tokens
    rounds: tuple[RoundLayout, ...]

    @classmethod
    def empty(cls) -> "EncodedConversation":
        """No rounds yet: what :meth:`ConversationEncoder.append` extends by the first round."""
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), rounds=())

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seg_positions(self) -> np.ndarray:
        """Position of every round's ``<seg>``, in round order."""
        return np.asarray([r.seg_position for r in self.rounds], dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """An added token placed by the template (not typed by the user)."""

    token_id: int
    kind: str  #: "image", "mask", "box", "seg" or "eos"


class ConversationEncoder:
    """Builds vicuna_v1 SegLLM prompts structurally: ids, labels and token layout per round."""

    def __init__(self, tokenizer: SegTokenizer, num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS) -> None:
        if num_image_tokens < 1:
            raise ConfigError(f"num_image_tokens must be positive, got {num_image_tokens}.")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens

    def encode(self, rounds: Sequence[Round]) -> EncodedConversation:
        """Encode a whole conversation (what the original tokenizes in one call)."""
        conversation = EncodedConversation.empty()
        for one in rounds:
            conversation = self.append(conversation, one)
        return conversation

    def append(self, conversation: EncodedConversation, new_round: Round) -> EncodedConversation:
        """Return ``conversation`` extended by one round.

        The new round's ids are ``result.input_ids[result.rounds[-1].start:]`` and equal the tail of a
        full rebuild, so a session can feed only those to a cached model.
        """
        first = not conversation.rounds
        parts = self._round_parts(new_round, first)
        start = conversation.num_tokens
        ids: list[int] = [self.tokenizer.bos_id] if first else []
        labels: list[int] = [IGNORE_INDEX] if first else []
        positions: dict[str, list[int]] = {"image": [], "mask": [], "box": [], "seg": []}
        previous = None if first else self.tokenizer.eos_id
        for i, part in enumerate(parts):
            if isinstance(part, _Slot):
                if part.kind != "eos":
                    positions[part.kind].append(start + len(ids))
                ids.append(part.token_id)
                supervised = part.kind in ("seg", "eos")
                labels.append(part.token_id if supervised else IGNORE_INDEX)
                previous = part.token_id
                continue
            following = parts[i + 1].token_id
            piece = self.tokenizer.encode_in_context(part, previous, following)
            labels.extend(self._label_piece(part, piece, previous, following))
            ids.extend(piece)
        layout = RoundLayout(
            start=start,
            end=start + len(ids),
            image_positions=np.asarray(positions["image"], np.int32),
            mask_encode_positions=np.asarray(positions["mask"], np.int32),
            box_encode_positions=np.asarray(positions["box"], np.int32),
            seg_position=positions["seg"][0],
        )
        return EncodedConversation(
            input_ids=np.concatenate([conversation.input_ids, np.asarray(ids, np.int32)]),
            labels=np.concatenate([conversation.labels, np.asarray(labels, np.int32)]),
            rounds=(*conversation.rounds, layout),
        )

    def prompt(self, rounds: Sequence[Round]) -> str:
        """The prompt string the original would build for ``rounds`` (without the BOS)."""
        text = []
        hf = self.tokenizer.hf
        for number, one in enumerate(rounds):
            for part in self._round_parts(one, number == 0):
                text.append(part if isinstance(part, str) else hf.convert_ids_to_tokens(part.token_id))
        return "".join(text)

    def _round_parts(self, one: Round, first: bool) -> list[str | _Slot]:
        """The round as alternating text pieces and template tokens, following vicuna_v1.

        The human turn is ``[image tokens + " "] + (mask, box) × num_refs + question``, the assistant
        turn is ``<seg>``; each turn is written ``ROLE: message`` and followed by a space (human) or
        ``</s>`` (assistant), and round 1 is preceded by the system prompt and a space.
        """
        self._check_round(one)
        tok = self.tokenizer
        parts: list[str | _Slot] = [(SYSTEM_PROMPT + " " if first else "") + f"{USER_ROLE}: "]
        if one.has_image:
            parts += [_Slot(tok.video_id, "image") for _ in range(self.num_image_tokens)]
            parts.append(" ")
        for _ in range(one.num_refs):
            parts += [_Slot(tok.video_id, "mask"), _Slot(tok.video_id, "box")]
        parts.append(f"{one.question} {ASSISTANT_ROLE}: ")
        parts += [_Slot(tok.seg_id, "seg"), _Slot(tok.eos_id, "eos")]
        return _merge_text(parts)

    def _label_piece(self, text: str, piece: list[int], previous: int | None, following: int) -> list[int]:
        """Labels of one text piece: only a piece ending the human turn has supervised tokens.

        The assistant message is ``" <seg>"``, so the tokens that the ``" "`` after ``ASSISTANT:``
        produces are the model's own output (the original supervises this ``▁`` too). They are found as
        the part of ``piece`` beyond its common prefix with the tokens of the text without that space.
        """
        if following != self.tokenizer.seg_id:
            return [IGNORE_INDEX] * len(piece)
        instruction = self.tokenizer.encode_in_context(text[:-1], previous, None)
        shared = 0
        while shared < min(len(piece), len(instruction)) and piece[shared] == instruction[shared]:
            shared += 1
        return [IGNORE_INDEX] * shared + piece[shared:]

    def _check_round(self, one: Round) -> None:
        """Refuse questions that would change the prompt's token structure."""
        if one.num_refs < 0:
            raise InputError(f"A round cannot have {one.num_refs} references.")
        found = [s for s in self.tokenizer.special_strings() if s in one.question]
        if found:
            raise InputError(
                f"The question {quote(one.question)} contains the reserved token text {found}; remove it."
            )


def _merge_text(parts: list[str | _Slot]) -> list[str | _Slot]:
    """Join adjacent text pieces and drop empty ones, so each piece sits between template tokens."""
    merged: list[str | _Slot] = []
    for part in parts:
        if isinstance(part, str):
            if not part:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += part
                continue
        merged.append(part)
    return merged


# --- user text ---------------------------------------------------------------------------------------

def quote(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message, shortened in the middle: a 20,000-character question must not
    turn a one-sentence error into a page."""
    if len(text) <= limit:
        return repr(text)
    half = limit // 2
    return f"{text[:half]!r}...{text[-half:]!r} ({len(text)} characters)"


_REF_TAG = re.compile(r"\[REF:\s*(\d+(?:\s*,\s*\d+)*)\s*\]")
_REF_LIKE = re.compile(r"\[\s*REF|REF\s*:", re.IGNORECASE)


def parse_references(text: str, num_previous_rounds: int | None = None) -> tuple[str, list[int]]:
    """Split ``[REF:k]`` tags (1-indexed earlier rounds) off a user query.

    Accepts several tags and comma lists (``[REF:1][REF:3]``, ``[REF:1,3]``); the original CLI kept only
    the first tag, its Gradio UI took a comma list. Tags are removed and nothing else (surrounding spaces
    stay), matching the original CLI. With ``num_previous_rounds`` every ``k`` must name an earlier round.
    Raises :class:`InputError` for a malformed tag, round 0, a repeated round or a future round.
    """
    refs: list[int] = []
    for match in _REF_TAG.finditer(text):
        refs.extend(int(k) for k in match.group(1).split(","))
    clean = _REF_TAG.sub("", text)
    if leftover := _REF_LIKE.search(clean):
        fragment = clean[leftover.start() : leftover.start() + 12]
        raise InputError(f"Malformed reference tag near {fragment!r}; write [REF:1] or [REF:1,3].")
    if any(k < 1 for k in refs):
        raise InputError(f"Reference rounds are 1-indexed; got {refs}.")
    if len(set(refs)) != len(refs):
        raise InputError(f"A round is referenced twice in {refs}.")
    if num_previous_rounds is not None and any(k > num_previous_rounds for k in refs):
        raise InputError(
            f"{quote(text)} references round {max(refs)}, but only {num_previous_rounds} earlier round(s) exist."
        )
    return clean, refs


# --- length limits -----------------------------------------------------------------------------------


def rounds_that_fit(conversation: EncodedConversation, max_length: int) -> int:
    """How many leading rounds of ``conversation`` fit in ``max_length`` tokens."""
    return sum(1 for layout in conversation.rounds if layout.end <= max_length)


def check_fits(conversation: EncodedConversation, max_length: int) -> None:
    """Raise :class:`InputError` if the conversation is longer than the model accepts.

    The original silently truncated at ``model_max_length``, which cuts off the last ``<seg>``; an
    explicit error is the only safe choice since every round needs its ``<seg>``.
    """
    needed = conversation.num_tokens
    if needed <= max_length:
        return
    fit = rounds_that_fit(conversation, max_length)
    total = len(conversation.rounds)
    if fit == 0:
        first = conversation.rounds[0].end
        raise InputError(
            f"The conversation needs {needed} tokens but the model accepts {max_length}; not even round 1 "
            f"fits ({first} tokens), so shorten the question."
        )
    used = conversation.rounds[fit - 1].end
    raise InputError(
        f"The conversation needs {needed} tokens but the model accepts {max_length}; only the first {fit} "
        f"of its {total} rounds fit ({used} tokens); clear the history to start a new conversation, or shorten "
        "the question."
    )
