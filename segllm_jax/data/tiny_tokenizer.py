"""A small LLaMA-style tokenizer trained on our own text (MR-Shapes questions), saved with a checkpoint.

Real SegLLM uses Vicuna's 32000-piece SentencePiece model; a tiny model trained on CPU needs a tiny
vocabulary in which every word the questions use is **one token**. A from-scratch 2-layer LLM has to
read "red" and "triangle" straight off the positions before ``<seg>``; spelling them letter by letter
(what a subword model trained on a few hundred distinct words degenerates to) spreads each word over
several positions and pushes the question far from the prompt position.

So this is a word-level model: SentencePiece-style spacing (``▁`` marks word starts, prepended to the
first word only, as LLaVA-1.5's non-legacy tokenizer does), punctuation split off as its own token, the
LLaMA special tokens ``<unk>``=0, ``<s>``=1, ``</s>``=2, BOS added and no EOS. It is saved as an HF fast
tokenizer that :meth:`segllm_jax.tokenizer.SegTokenizer.from_pretrained` loads like a released one.

Train it on the text the model will read as text (questions, the system prompt, the role names), never
on placeholder payloads such as ``[IMAGE256:path]``: those become template tokens, not words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from segllm_jax.errors import TokenizerError

SPECIAL = ("<unk>", "<s>", "</s>")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])


def word_vocabulary(texts: Iterable[str]) -> list[str]:
    """The pieces of a word-level vocabulary for ``texts``, special tokens first.

    Every word gets two pieces: ``▁word`` (after a space) and ``word`` (right after a template token
    such as ``<video>`` or ``</s>``, where SentencePiece spacing puts no word-start mark), plus ``▁``
    itself (the space before a template token). Punctuation marks are pieces of their own.
    """
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        words.update(piece.lstrip("▁") for piece, _ in pre.pre_tokenize_str(text))
    words.discard("")
    pieces = [*SPECIAL, "▁"]
    for word in sorted(words):
        pieces += [word] if all(not c.isalnum() for c in word) else ["▁" + word, word]
    return pieces


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int | None = None) -> Path:
    """Builds the vocabulary of ``texts`` and writes ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``.

    ``vocab_size`` (special tokens included) defaults to exactly what the corpus needs
    (:func:`word_vocabulary`). A given size must equal that number: a smaller one would turn the rarest
    words into ``<unk>`` and a larger one cannot be filled, so either raises
    :class:`~segllm_jax.errors.TokenizerError` instead of silently training something else.
    """
    from transformers import PreTrainedTokenizerFast

    pieces = word_vocabulary(texts)
    if vocab_size is not None and vocab_size != len(pieces):
        raise TokenizerError(f"the training text needs a word-level vocabulary of {len(pieces)} pieces, not the "
                             f"requested {vocab_size}; pass vocab_size=None (or that number).")
    tok = Tokenizer(models.WordLevel(vocab={p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=2048, padding_side="right")
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
