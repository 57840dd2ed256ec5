"""The one place where segllm-jax turns text into token ids.

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
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segllm_jax.errors import ConfigError, InputError, TokenizerError

#: Tokens SegLLM adds to the LLaMA vocabulary, in the order they were added (architecture.md §D2). The order fixes
#: their ids, which index the checkpoint's embedding rows, so it must never change.
SEGLLM_ADDED_TOKENS: tuple[str, ...] = (
    "<im_gen_start>",
    "<im_gen>",
    "<mask_gen>",
    "<audio_gen>",
    "<audio_gen_start>",
    "<audio>",
    "<video>",
    "<base>",
    "<base_null>",
    "<seg>",
    "<seg_input>",
)
VIDEO_TOKEN = "<video>"
SEG_TOKEN = "<seg>"

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


class SegTokenizer:
    """An HF LLaMA tokenizer that is guaranteed to carry SegLLM's added tokens with the right ids."""

    def __init__(self, hf_tokenizer) -> None:
        """Wrap ``hf_tokenizer``, adding SegLLM's tokens if it has none and checking them otherwise."""
        self._hf = hf_tokenizer
        _ensure_added_tokens(hf_tokenizer)
        if hf_tokenizer.pad_token is None:
            # The original pads with <unk> (id 0 for LLaMA); padding never reaches the loss.
            hf_tokenizer.pad_token = hf_tokenizer.unk_token
        self._check_special_tokens()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SegTokenizer:
        """Load the tokenizer stored in a checkpoint folder, offline.

        A folder with ``tokenizer.json`` or ``tokenizer_config.json`` is loaded with ``AutoTokenizer``
        (as the original did). A folder holding only ``tokenizer.model`` is loaded as a LLaMA tokenizer
        with LLaVA-1.5's settings (BOS added, no EOS, non-legacy spacing); ``AutoTokenizer`` would
        otherwise pick a generic SentencePiece converter that puts ``▁`` after every added token and so
        yields ids the model was never trained on.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"Tokenizer folder {folder} does not exist.")
        has_config = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
        if not has_config and not (folder / "tokenizer.model").is_file():
            raise TokenizerError(
                f"{folder} holds no tokenizer (expected tokenizer.json, tokenizer_config.json "
                "or tokenizer.model)."
            )
        from transformers import AutoTokenizer, LlamaTokenizer

        try:
            if has_config:
                hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            else:
                hf = LlamaTokenizer.from_pretrained(
                    folder, local_files_only=True, legacy=False, add_bos_token=True, add_eos_token=False
                )
        except Exception as err:  # transformers/tokenizers report a broken file with many types
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise TokenizerError(f"Cannot load the tokenizer in {folder} ({detail}); the tokenizer files are "
                                 "damaged, copy them again from the source checkpoint.") from err
        tokenizer = cls(hf)
        if tokenizer.marks_word_start_after_added_tokens():
            warnings.warn(
                f"The tokenizer in {folder} puts a word-start '▁' after added tokens such as </s> (legacy "
                "SentencePiece spacing); SegLLM was trained without it (LLaVA-1.5 sets legacy=false), so "
                "prompts will not match the trained ids. Load the tokenizer saved with the checkpoint.",
                stacklevel=2,
            )
        return tokenizer

    @property
    def hf(self):
        """The wrapped HF tokenizer (for code that needs its full API, e.g. decoding)."""
        return self._hf

    @property
    def video_id(self) -> int:
        """Id of ``<video>``, the placeholder for image patches and mask/box encodings."""
        return self.token_id(VIDEO_TOKEN)

    @property
    def seg_id(self) -> int:
        """Id of ``<seg>``, the single token every assistant turn consists of."""
        return self.token_id(SEG_TOKEN)

    @property
    def bos_id(self) -> int:
        return self._hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self._hf.eos_token_id

    @property
    def pad_id(self) -> int:
        """Padding id; equals the ``<unk>`` id as in the original."""
        return self._hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (the embedding table must have this many rows)."""
        return len(self._hf)

    def token_id(self, token: str) -> int:
        """Id of one token string, read from the tokenizer."""
        return int(self._hf.convert_tokens_to_ids(token))

    def check_vocab_size(self, model_vocab_size: int) -> None:
        """Raise if the model's embedding table does not match this tokenizer.

        SegLLM resized its embeddings to exactly ``len(tokenizer)``, so any difference means the
        tokenizer and the weights come from different checkpoints.
        """
        if model_vocab_size != self.vocab_size:
            raise TokenizerError(
                f"The model config has vocab_size {model_vocab_size} but the tokenizer has "
                f"{self.vocab_size} tokens (seg_id {self.seg_id}, video_id {self.video_id}); load the "
                "tokenizer saved with this checkpoint."
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer files (including the added tokens) into ``path``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self._hf.save_pretrained(str(path))

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """Tokenize a whole prompt string in one call, as the original does (BOS prepended).

        The conversation encoder never needs this; it is the reference its output is checked against.
        """
        return np.asarray(self._hf(prompt, add_special_tokens=True).input_ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Turn ids back into text, keeping special tokens visible."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_strings(self) -> tuple[str, ...]:
        """Strings the tokenizer turns into single added/special tokens wherever they occur in text."""
        return tuple(self._hf.get_added_vocab())

    def encode_in_context(self, text: str, before: int | None, after: int | None) -> list[int]:
        """Ids of ``text`` as whole-string tokenization produces them between two added tokens.

        ``before``/``after`` are the ids of the added tokens around ``text`` (``before=None`` means
        ``text`` starts the prompt, right after BOS). The neighbours are tokenized along with the text
        and cut off again, so the ``▁`` prefix rule and any space stripping by them apply exactly as in
        the full prompt.
        """
        left = "" if before is None else self._hf.convert_ids_to_tokens(before)
        right = "" if after is None else self._hf.convert_ids_to_tokens(after)
        ids = list(self._hf(left + text + right, add_special_tokens=False).input_ids)
        if before is not None:
            if not ids or ids[0] != before:
                raise TokenizerError(f"Token {left!r} does not tokenize to its own id {before}.")
            ids = ids[1:]
        if after is not None:
            if not ids or ids[-1] != after:
                raise TokenizerError(f"Token {right!r} does not tokenize to its own id {after}.")
            ids = ids[:-1]
        return ids

    def marks_word_start_after_added_tokens(self) -> bool:
        """Whether text right after an added token gets SentencePiece's ``▁`` (legacy spacing).

        The original ran transformers 4.46 on LLaVA-1.5's tokenizer (``legacy=false``), where
        ``</s>USER`` yields ``USER`` rather than ``▁US ER``; its label arithmetic only works that way.
        """
        first = self.encode_in_context("USER", self.eos_id, None)[0]
        return self._hf.convert_ids_to_tokens(first).startswith("▁")

    def _check_special_tokens(self) -> None:
        """Fail early on a tokenizer that cannot produce SegLLM prompts (missing BOS/EOS, auto EOS)."""
        if self.bos_id is None or self.eos_id is None or self.pad_id is None:
            raise TokenizerError(
                "The tokenizer lacks a BOS, EOS or UNK token; SegLLM needs LLaMA's <s>, </s> and <unk>."
            )
        with_special = list(self._hf("a", add_special_tokens=True).input_ids)
        plain = list(self._hf("a", add_special_tokens=False).input_ids)
        if with_special != [self.bos_id, *plain]:
            raise TokenizerError(
                "SegLLM prompts start with BOS and get no automatic EOS, but this tokenizer turns 'a' "
                f"into {with_special}; set add_bos_token=True and add_eos_token=False."
            )


def _ensure_added_tokens(hf_tokenizer) -> None:
    """Add SegLLM's tokens to a base vocabulary, or check an extended one has them in order.

    A partial set or a different order would give ``<video>``/``<seg>`` ids that point at the wrong
    embedding rows of the checkpoint, so both are refused rather than repaired.
    """
    vocab = hf_tokenizer.get_vocab()
    present = [tok for tok in SEGLLM_ADDED_TOKENS if tok in vocab]
    if not present:
        hf_tokenizer.add_tokens(list(SEGLLM_ADDED_TOKENS), special_tokens=True)
        vocab = hf_tokenizer.get_vocab()
    elif len(present) != len(SEGLLM_ADDED_TOKENS):
        missing = [tok for tok in SEGLLM_ADDED_TOKENS if tok not in vocab]
        raise TokenizerError(f"The tokenizer has only some of SegLLM's added tokens; missing {missing}.")
    ids = [int(hf_tokenizer.convert_tokens_to_ids(tok)) for tok in SEGLLM_ADDED_TOKENS]
    if ids != list(range(ids[0], ids[0] + len(ids))):
        listing = ", ".join(f"{tok}={i}" for tok, i in zip(SEGLLM_ADDED_TOKENS, ids, strict=True))
        raise TokenizerError(
            f"SegLLM's added tokens must have consecutive ids in the order of docs/architecture.md §D2; got {listing}."
        )


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
