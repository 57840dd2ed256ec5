"""The word-level tokenizer of the tiny MR-Shapes model: every question word is one token, the structural
encoding equals tokenizing the whole prompt string, and a vocabulary size it cannot honour is refused."""

from __future__ import annotations

import numpy as np
import pytest

from segllm_jax.data import mrshapes
from segllm_jax.data.tiny_tokenizer import train_tokenizer, word_vocabulary
from segllm_jax.errors import TokenizerError
from segllm_jax.prompt import ASSISTANT_ROLE, SYSTEM_PROMPT, USER_ROLE, ConversationEncoder, Round
from segllm_jax.tokenizer import SegTokenizer

TEXTS = [f"{SYSTEM_PROMPT} {USER_ROLE}: {ASSISTANT_ROLE}:", mrshapes.vocabulary_text()]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SegTokenizer:
    return SegTokenizer.from_pretrained(train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok")))


def test_question_words_are_single_tokens(tokenizer):
    question = "Can you segment the purple hexagon farthest from instance 3?"
    pieces = tokenizer.hf.tokenize(question)
    assert pieces == ["▁Can", "▁you", "▁segment", "▁the", "▁purple", "▁hexagon", "▁farthest", "▁from",
                      "▁instance", "▁3", "?"]
    assert tokenizer.hf.unk_token_id not in tokenizer.hf(question)["input_ids"]
    for word in (*mrshapes.KINDS, *mrshapes.PALETTE, *mrshapes.EXTREMES):  # every generator word is known
        assert tokenizer.hf.tokenize(f"the {word}") == ["▁the", f"▁{word}"], word


def test_system_prompt_is_short_and_prompts_match_the_whole_string(tokenizer):
    encoder = ConversationEncoder(tokenizer, num_image_tokens=16)
    rounds = [Round("Please segment the topmost red triangle.", has_image=True),
              Round("Find the nearest shape above instance 1.", num_refs=1),
              Round("Where is the other star of the same type as instance 2?", num_refs=1)]
    conv = encoder.encode(rounds)
    np.testing.assert_array_equal(conv.input_ids, tokenizer.encode_prompt(encoder.prompt(rounds)))
    assert tokenizer.hf.unk_token_id not in conv.input_ids.tolist()
    assert len(tokenizer.hf.tokenize(SYSTEM_PROMPT)) <= 33
    assert tokenizer.decode(conv.input_ids).count("instance") == 2


def test_vocabulary_size_must_be_what_the_text_needs(tmp_path):
    needed = len(word_vocabulary(TEXTS))
    assert needed < 200
    train_tokenizer(TEXTS, tmp_path / "exact", vocab_size=needed)
    for wrong in (needed - 1, needed + 100):
        with pytest.raises(TokenizerError, match=str(needed)):
            train_tokenizer(TEXTS, tmp_path / f"v{wrong}", vocab_size=wrong)
        assert not (tmp_path / f"v{wrong}").exists()
