"""SegTokenizer: the HF LLaMA tokenizer, guaranteed to carry SegLLM's added tokens with the right ids.

It loads a checkpoint's tokenizer files offline, checks them (added tokens, BOS/EOS, spacing), and tokenizes
a text piece *in context*, between the added tokens around it: the operation :mod:`segllm_jax.prompt` builds
SegLLM's prompts from.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segllm_jax.errors import TokenizerError

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
