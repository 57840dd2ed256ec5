"""segllm_jax.tokenizer and segllm_jax.prompt against a real 32000-piece LLaMA-style SentencePiece model (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizer_fixture import LLAVA_TOKENIZER_CONFIG, make_llama_tokenizer_dir
from tokenizers import normalizers
from transformers import LlamaTokenizer

from segllm_jax.errors import InputError, TokenizerError
from segllm_jax.prompt import IGNORE_INDEX, ConversationEncoder, Round, check_fits, parse_references, rounds_that_fit
from segllm_jax.tokenizer import SEGLLM_ADDED_TOKENS, SegTokenizer

N_IMAGE = 4  # image placeholders per image in most tests; one test uses the real 256

CONVERSATIONS = {
    "cli_example": [
        Round("Segment the person wearing glasses.", has_image=True),
        Round("Segment the his hair.", num_refs=1),
        Round("Segment the person next to him. ", num_refs=1),
        Round("Segment the bag that she is carrying.", num_refs=1),
    ],
    "mixed": [
        Round("  leading spaces and a trailing one ", has_image=True),
        Round("no reference, 3 digits 123 and punctuation?!"),
        Round("two refs: between instance 1 and 2", num_refs=2),
        Round("", num_refs=1),
        Round("ünïcödé ✓ and a\nnewline", num_refs=3),
        Round(" USER: ASSISTANT: inside the question"),
    ],
    "image_and_refs_in_one_round": [
        Round("first", has_image=True),
        Round("second image", num_refs=1, has_image=True),
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SegTokenizer:
    """Loaded from a folder holding only tokenizer.model (the fallback path)."""
    return SegTokenizer.from_pretrained(make_llama_tokenizer_dir(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def encoder(tokenizer) -> ConversationEncoder:
    return ConversationEncoder(tokenizer, num_image_tokens=N_IMAGE)


def test_special_ids_read_from_tokenizer(tokenizer):
    hf = tokenizer.hf
    ids = [hf.convert_tokens_to_ids(t) for t in SEGLLM_ADDED_TOKENS]
    assert ids == list(range(32000, 32011))
    assert tokenizer.video_id == hf.convert_tokens_to_ids("<video>") == 32006
    assert tokenizer.seg_id == hf.convert_tokens_to_ids("<seg>") == 32009
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.pad_id == hf.unk_token_id
    assert tokenizer.vocab_size == 32011


def test_llava_config_folder_loads_the_same(tmp_path, tokenizer, encoder):
    """A LLaVA-1.5 style folder (tokenizer.model + tokenizer_config.json) goes through AutoTokenizer."""
    other = SegTokenizer.from_pretrained(make_llama_tokenizer_dir(tmp_path, with_config=True))
    assert other.vocab_size == tokenizer.vocab_size and other.seg_id == tokenizer.seg_id
    rounds = CONVERSATIONS["cli_example"]
    prompt = encoder.prompt(rounds)
    np.testing.assert_array_equal(other.encode_prompt(prompt), tokenizer.encode_prompt(prompt))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_structural_equals_whole_string(encoder, tokenizer, name):
    rounds = CONVERSATIONS[name]
    conv = encoder.encode(rounds)
    whole = tokenizer.encode_prompt(encoder.prompt(rounds))
    np.testing.assert_array_equal(conv.input_ids, whole)
    assert conv.input_ids.dtype == np.int32 and conv.labels.dtype == np.int32


def test_structural_equals_whole_string_with_256_image_tokens(tokenizer):
    encoder = ConversationEncoder(tokenizer)  # default: 256
    rounds = CONVERSATIONS["cli_example"]
    conv = encoder.encode(rounds)
    np.testing.assert_array_equal(conv.input_ids, tokenizer.encode_prompt(encoder.prompt(rounds)))
    assert conv.rounds[0].image_positions.size == 256
    assert encoder.prompt(rounds).count("<video>") == 256 + 2 * 3


def _legacy_tokenizer(folder, variant: str):
    """LLaMA tokenizers with the spacing rules of other transformers versions.

    ``metaspace``: transformers 5 ``legacy=True`` (``▁`` before every piece not already starting with
    one); ``prepend``: the transformers 4.31 conversion (a normalizer prepending ``▁`` to every piece).
    """
    hf = LlamaTokenizer.from_pretrained(folder, local_files_only=True, legacy=True, add_bos_token=True)
    if variant == "prepend":
        hf.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        hf.backend_tokenizer.pre_tokenizer = None
    return hf


@pytest.mark.parametrize("variant", ["metaspace", "prepend"])
def test_structural_equals_whole_string_for_legacy_spacing(tmp_path, variant):
    """The in-context trick does not depend on the tokenizer's ``▁`` rule: check legacy rules too."""
    tokenizer = SegTokenizer(_legacy_tokenizer(make_llama_tokenizer_dir(tmp_path), variant))
    assert tokenizer.marks_word_start_after_added_tokens()
    encoder = ConversationEncoder(tokenizer, num_image_tokens=N_IMAGE)
    for rounds in CONVERSATIONS.values():
        conv = encoder.encode(rounds)
        np.testing.assert_array_equal(conv.input_ids, tokenizer.encode_prompt(encoder.prompt(rounds)))


def test_loading_a_legacy_tokenizer_warns(tmp_path, tokenizer):
    assert not tokenizer.marks_word_start_after_added_tokens()
    config = dict(LLAVA_TOKENIZER_CONFIG, legacy=True)
    folder = make_llama_tokenizer_dir(tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="legacy"):
        SegTokenizer.from_pretrained(folder)


def test_sentencepiece_boundaries_are_context_dependent(tokenizer):
    """Why pieces are tokenized in context: the same text gets different ids at the start and after </s>."""
    hf = tokenizer.hf
    alone = hf("USER: x", add_special_tokens=False).input_ids
    after_eos = tokenizer.encode_in_context("USER: x", tokenizer.eos_id, None)
    assert hf.convert_ids_to_tokens(alone)[0].startswith("▁")
    assert hf.convert_ids_to_tokens(after_eos)[0] == "USER"
    after_video = tokenizer.encode_in_context("Segment", tokenizer.video_id, None)
    assert hf.convert_ids_to_tokens(after_video) == ["Segment"]


def test_prompt_text_matches_template(encoder):
    rounds = [Round("Segment the cat.", has_image=True), Round("Its tail.", num_refs=1), Round("The dog.")]
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: " + "<video>" * N_IMAGE
        + " Segment the cat. ASSISTANT: <seg></s>USER: <video><video>Its tail. ASSISTANT: <seg></s>"
        "USER: The dog. ASSISTANT: <seg></s>"
    )
    assert encoder.prompt(rounds) == expected


@pytest.mark.parametrize("name", ["cli_example", "image_and_refs_in_one_round"])
def test_decode_round_trips(encoder, tokenizer, name):
    rounds = CONVERSATIONS[name]
    conv = encoder.encode(rounds)
    assert conv.input_ids[0] == tokenizer.bos_id
    assert tokenizer.decode(conv.input_ids[1:]) == encoder.prompt(rounds)


def test_labels_cover_exactly_the_assistant_spans(encoder, tokenizer):
    conv = encoder.encode(CONVERSATIONS["mixed"])
    space_id = tokenizer.hf.convert_tokens_to_ids("▁")
    expected = np.full_like(conv.input_ids, IGNORE_INDEX)
    for layout in conv.rounds:
        # The assistant turn is " <seg></s>": the lone ▁ piece, <seg>, and the closing </s>.
        assert conv.input_ids[layout.seg_position - 1] == space_id
        assert conv.input_ids[layout.end - 1] == tokenizer.eos_id
        for pos in (layout.seg_position - 1, layout.seg_position, layout.end - 1):
            expected[pos] = conv.input_ids[pos]
        assert layout.end == layout.seg_position + 2
    np.testing.assert_array_equal(conv.labels, expected)


def test_layout_positions(encoder, tokenizer):
    rounds = CONVERSATIONS["mixed"]
    conv = encoder.encode(rounds)
    ids = conv.input_ids
    assert [r.start for r in conv.rounds[1:]] == [r.end for r in conv.rounds[:-1]]
    assert conv.rounds[0].start == 0 and conv.rounds[-1].end == conv.num_tokens
    np.testing.assert_array_equal(ids[conv.seg_positions], tokenizer.seg_id)
    assert np.count_nonzero(ids == tokenizer.seg_id) == len(rounds)
    for one, layout in zip(rounds, conv.rounds, strict=True):
        image = layout.image_positions
        assert image.size == (N_IMAGE if one.has_image else 0)
        np.testing.assert_array_equal(np.diff(image), 1)
        assert layout.mask_encode_positions.size == layout.box_encode_positions.size == one.num_refs
        # refs come as (mask, box) pairs, back to back
        np.testing.assert_array_equal(layout.box_encode_positions, layout.mask_encode_positions + 1)
        np.testing.assert_array_equal(np.diff(layout.mask_encode_positions), 2)
        assert layout.start <= min([layout.seg_position, *image, *layout.mask_encode_positions])
        assert layout.seg_position < layout.end

    # the <video> tokens are exactly the layouts' image, mask-encode and box-encode positions
    video = np.concatenate([np.concatenate([r.image_positions, r.mask_encode_positions, r.box_encode_positions])
                            for r in conv.rounds])
    np.testing.assert_array_equal(np.sort(video), np.flatnonzero(ids == tokenizer.video_id))


def test_incremental_append_equals_full_rebuild(encoder):
    rounds = CONVERSATIONS["mixed"]
    conv = encoder.encode(rounds[:1])
    for n in range(2, len(rounds) + 1):
        before = conv.num_tokens
        conv = encoder.append(conv, rounds[n - 1])
        full = encoder.encode(rounds[:n])
        assert conv.rounds[-1].start == before
        np.testing.assert_array_equal(conv.input_ids, full.input_ids)
        np.testing.assert_array_equal(conv.labels, full.labels)
        np.testing.assert_array_equal(conv.input_ids[before:], full.input_ids[before:])
        assert [r.seg_position for r in conv.rounds] == [r.seg_position for r in full.rounds]


def test_reserved_text_in_question_is_refused(encoder):
    with pytest.raises(InputError, match="reserved"):
        encoder.encode([Round("what is <seg>?", has_image=True)])
    with pytest.raises(InputError, match="reserved"):
        encoder.encode([Round("a</s>b", has_image=True)])


@pytest.mark.parametrize(
    ("text", "clean", "refs"),
    [
        ("Segment the his hair.[REF:1]", "Segment the his hair.", [1]),
        ("Segment the person next to him.[REF:1] ", "Segment the person next to him. ", [1]),
        ("between [REF:1] and [REF:3].", "between  and .", [1, 3]),
        ("both[REF:1][REF:3]", "both", [1, 3]),
        ("both[REF: 2, 1 ]", "both", [2, 1]),
        ("no tag here", "no tag here", []),
    ],
)
def test_parse_references(text, clean, refs):
    assert parse_references(text) == (clean, refs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x [REF:]", "Malformed"),
        ("x [REF:a]", "Malformed"),
        ("x [REF:1,]", "Malformed"),
        ("x [REF:1", "Malformed"),
        ("x [ref:1]", "Malformed"),
        ("x [REF 1]", "Malformed"),
        ("x [REF:0]", "1-indexed"),
        ("x [REF:2][REF:2]", "twice"),
    ],
)
def test_parse_references_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_references(text)


def test_parse_references_checks_earlier_rounds():
    assert parse_references("x[REF:2]", num_previous_rounds=2) == ("x", [2])
    with pytest.raises(InputError, match="only 2 earlier"):
        parse_references("x[REF:3]", num_previous_rounds=2)


def test_check_fits_names_the_rounds_that_fit(encoder):
    rounds = CONVERSATIONS["cli_example"]
    conv = encoder.encode(rounds)
    check_fits(conv, conv.num_tokens)
    limit = conv.rounds[1].end + 1
    assert rounds_that_fit(conv, limit) == 2
    message = rf"needs {conv.num_tokens} tokens.*only the first 2 of its 4 rounds"
    with pytest.raises(InputError, match=message):
        check_fits(conv, limit)
    with pytest.raises(InputError, match="not even round 1"):
        check_fits(conv, 10)


def test_check_vocab_size(tokenizer):
    tokenizer.check_vocab_size(32011)
    with pytest.raises(TokenizerError, match="vocab_size 32000"):
        tokenizer.check_vocab_size(32000)


def test_save_and_reload_keeps_added_tokens(tmp_path, tokenizer, encoder):
    tokenizer.save(tmp_path / "saved")
    reloaded = SegTokenizer.from_pretrained(tmp_path / "saved")
    names = list(SEGLLM_ADDED_TOKENS)
    assert reloaded.hf.convert_tokens_to_ids(names) == tokenizer.hf.convert_tokens_to_ids(names)
    assert (reloaded.vocab_size, reloaded.pad_id) == (tokenizer.vocab_size, tokenizer.pad_id)
    rounds = CONVERSATIONS["mixed"]
    re_encoded = ConversationEncoder(reloaded, num_image_tokens=N_IMAGE).encode(rounds)
    np.testing.assert_array_equal(re_encoded.input_ids, encoder.encode(rounds).input_ids)


def test_partial_or_reordered_added_tokens_are_refused(tmp_path):
    folder = make_llama_tokenizer_dir(tmp_path)
    partial = LlamaTokenizer.from_pretrained(folder, local_files_only=True, add_bos_token=True)
    partial.add_tokens(["<video>", "<seg>"], special_tokens=True)
    with pytest.raises(TokenizerError, match="missing"):
        SegTokenizer(partial)
    reordered = LlamaTokenizer.from_pretrained(folder, local_files_only=True, add_bos_token=True)
    reordered.add_tokens(list(reversed(SEGLLM_ADDED_TOKENS)), special_tokens=True)
    with pytest.raises(TokenizerError, match="consecutive ids"):
        SegTokenizer(reordered)


def test_missing_folder_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        SegTokenizer.from_pretrained(tmp_path)
