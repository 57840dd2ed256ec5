"""A tiny SegLLM release folder -> convert -> load -> 4-round scripted chat, three ways that must agree."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import segllm_jax
from segllm_jax import batch as batching
from segllm_jax.apps.cli import main
from segllm_jax.session import MultiRoundSession

from .conftest import golden_segllm_dir

pytestmark = pytest.mark.skipif(not (golden_segllm_dir() / "state_dict_keys.json").exists(),
                                reason="the release key list comes from ../shared/golden/segllm")

SCRIPT = ["Segment the red square.", "Segment the shape next to it.[REF:1]", "Segment the largest shape.",
          "Segment the shape left of it.[REF:3]"]

def test_release_converts_and_loads(tiny):
    _, loaded = tiny
    assert loaded.kind == "segllm" and loaded.tokenizer.vocab_size == loaded.config.llm.vocab_size == 32011
    assert loaded.config.num_image_tokens == 16 and loaded.config.hipie_image_size == 64

def test_incremental_recompute_and_batch_agree(tiny):
    root, loaded = tiny
    inc = MultiRoundSession(loaded, root / "scene.png", mode="incremental")
    rec = MultiRoundSession(loaded, root / "scene.png", mode="recompute")
    for text in SCRIPT:
        a, b = inc.ask(text), rec.ask(text)
        np.testing.assert_allclose(a.prompt_hidden, b.prompt_hidden, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.prompt, b.prompt, rtol=1e-5, atol=1e-5)
        assert (a.mask_frame == b.mask_frame).mean() > 0.999
        assert a.mask.shape == (48, 80)
    assert [r.refs for r in inc.rounds] == [(), (1,), (), (3,)]

    # the teacher-forced batch path (two copies of the conversation, one padded) gives the same prompts
    conv = inc._conversation
    refs = [[batching.Reference(inc.rounds[k - 1].ref_crop, inc.rounds[k - 1].ref_box) for k in r.refs]
            for r in inc.rounds]
    clip = inc.ctx.clip_pixels[None]
    batch = batching.collate([conv, conv], clip, [0, 0], [refs, refs], pad_to=conv.num_tokens + 7)
    _, prompts = batching.forward(loaded.model, batch)
    want = np.stack([r.prompt for r in inc.rounds])
    np.testing.assert_allclose(np.asarray(prompts[:4]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(prompts[4:]), want, rtol=1e-5, atol=1e-5)

def test_cli_chat_script_writes_results(tiny, tmp_path, capsys):
    root, _ = tiny
    script = tmp_path / "script.txt"
    script.write_text("\n".join(SCRIPT) + "\n")
    out = tmp_path / "out"
    code = main(["chat", "--checkpoint", str(root / "converted"), "--image", str(root / "scene.png"),
                 "--script", str(script), "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["refs"] for r in results["rounds"]] == [[], [1], [], [3]]
    for r in range(1, 5):
        overlay = Image.open(out / f"round_{r}.png")
        mask = np.asarray(Image.open(out / f"round_{r}_mask.png"))
        assert overlay.size == (80, 48) and mask.shape == (48, 80)
        assert results["rounds"][r - 1]["mask"] == f"round_{r}_mask.png"
    transcript = capsys.readouterr().out
    assert "round 4" in transcript
    print(transcript)

def test_check_conversion_covers_the_whole_model(tiny, capsys):
    root, _ = tiny
    assert main(["check-conversion", str(root / "release"), str(root / "converted")]) == 0
    out = capsys.readouterr().out
    for part in ("llm.layers.0", "vision_tower.layers.0", "mm_projector", "mask_enc_head", "segmentator_predictor"):
        assert f"| {part}" in out
    assert "PASS" in out
    print(out)

def test_training_init_from_three_sources(tmp_path, tiny):
    """llava-v1.5 folder + CLIP folder + r50_parts.pth -> one SegLLM checkpoint that runs a round."""
    from .tiny_release import write_tiny_training_sources

    root, _ = tiny
    llava, clip, hipie, state = write_tiny_training_sources(tmp_path / "sources")
    assert main(["convert", "--llava", str(llava), "--clip", str(clip), "--hipie", str(hipie),
                 str(tmp_path / "init"), "--quiet"]) == 0
    loaded = segllm_jax.load(tmp_path / "init")
    embed = np.asarray(loaded.model.llm.embed_tokens.embedding[...])
    assert loaded.tokenizer.vocab_size == embed.shape[0] == 32011
    np.testing.assert_array_equal(embed[:32000], state["model.embed_tokens.weight"][:32000])
    new_rows = embed[32000:]
    assert 0.01 < new_rows.std() < 0.03 and not np.allclose(new_rows, embed[32000 - 11:32000])
    head = np.asarray(loaded.model.llm.lm_head.kernel[...])
    np.testing.assert_array_equal(head[:, :32000], state["lm_head.weight"][:32000].T)
    np.testing.assert_array_equal(np.asarray(loaded.model.segmentator.level_embed.embedding[...]),
                                  state["model.segmentator.hipie.detr.detr.transformer.level_embed"])
    bound = 1 / np.sqrt(4)  # PyTorch's default Linear init for the new box encoder
    box = np.asarray(loaded.model.mask_enc_head.kernel[...])
    assert np.abs(box).max() <= bound and box.std() > bound / 3
    MultiRoundSession(loaded, root / "scene.png").ask("Segment the red square.")

# One `infer` group (batch size 6): conversations of 4, 1 and 2 rounds of different lengths with [REF:k]
# references, and three that fail: a reference to a round that does not exist yet, a missing image, a round 2
# that makes the conversation longer than the model's context (after a round 1 that runs).
INFER_GROUP = [("scene.png", SCRIPT), ("other.png", ["Segment the small blue shape in the top left corner, please."]),
               ("scene.png", [SCRIPT[2], "Segment the shape that is left of it.[REF:1]"]),
               ("scene.png", ["Segment it.[REF:3]"]), ("missing.png", SCRIPT[:1]),
               ("other.png", ["Segment it.", "Segment the red square " * 500])]

@pytest.fixture(scope="module")
def infer_group_sessions(tiny, tmp_path_factory):
    """(image paths, per conversation: its MultiRoundSession answers and the sentence that stopped it or None)."""
    from segllm_jax.errors import InputError

    root, loaded = tiny
    folder = tmp_path_factory.mktemp("infer_group")
    shutil.copy(root / "scene.png", folder / "scene.png")
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "other.png")
    images = [folder / name for name, _ in INFER_GROUP]
    answers = []
    for image, (_, queries) in zip(images, INFER_GROUP, strict=True):
        rounds, error = [], None
        try:
            session = MultiRoundSession(loaded, image)
        except InputError as e:  # the image
            answers.append((rounds, str(e)))
            continue
        for q in queries:
            try:
                rounds.append(session.ask(q))
            except InputError as e:  # a round: the session stays usable, infer stops the conversation
                error = f"round {len(rounds) + 1}: {e}"
                break
        answers.append((rounds, error))
    assert [len(r) for r, _ in answers] == [4, 1, 2, 0, 0, 1] and "model accepts" in answers[5][1]
    return images, answers

def test_batched_infer_matches_sessions(tiny, infer_group_sessions, tmp_path):
    """`segllm-jax infer` writes each conversation's answers (equal to its own session's) or its error."""
    root, _ = tiny
    images, answers = infer_group_sessions
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": str(i), "queries": q})
                                  for i, (_, q) in zip(images, INFER_GROUP, strict=True)) + "\n")
    assert main(["infer", "--checkpoint", str(root / "converted"), "--manifest", str(manifest),
                 "--out", str(tmp_path / "out"), "--batch-size", "6"]) == 1  # three conversations fail
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "round 1" in results[3]["error"] and "does not exist" in results[4]["error"]
    for entry, (rounds, error) in zip(results, answers, strict=True):
        assert entry["error"] == error and len(entry["rounds"]) == len(rounds)
        for got, want in zip(entry["rounds"], rounds, strict=True):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / got["mask"])) > 0, want.mask)
            np.testing.assert_allclose(got["box"], want.box, atol=0.02)

@pytest.mark.parametrize("mode", ["incremental", "recompute"])
def test_batched_infer_equals_sessions(tiny, infer_group_sessions, mode):
    """The group shares one KV cache (incremental) or is rebuilt each round (recompute, the benchmark's
    baseline); either way each answer equals its own incremental session's: hidden state and HIPIE prompt
    within 1e-5 of their largest magnitude (float32 rounding: other shapes, other summation orders),
    masks identical, boxes and scores to float32 rounding."""
    from segllm_jax.apps.infer import Conversation, infer_group

    _, loaded = tiny
    images, answers = infer_group_sessions
    group = [Conversation(str(i), str(image), queries) for i, (image, (_, queries)) in
             enumerate(zip(images, INFER_GROUP, strict=True))]
    infer_group(loaded, group, mode=mode)
    for conv, (rounds, error) in zip(group, answers, strict=True):
        assert conv.error == error and len(conv.results) == len(rounds)
        for got, want in zip(conv.results, rounds, strict=True):
            for a, b in ((got.prompt_hidden, want.prompt_hidden), (got.prompt, want.prompt)):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
            np.testing.assert_array_equal(got.mask_frame, want.mask_frame)
            np.testing.assert_array_equal(got.mask, want.mask)
            np.testing.assert_allclose(got.box_frame, want.box_frame, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
            assert got.refs == want.refs and got.text == want.text

def test_a_full_cache_grows_with_free_slots():
    """A session whose padded rounds outrun the cache's capacity gets more (bucketed) slots, its keys,
    values and end kept, the new slots invalid (attention never sees them)."""
    from segllm_jax.config import SegLLMConfig
    from segllm_jax.models.llama import KVCache
    from segllm_jax.session import CACHE_BUCKET, with_room

    cfg = SegLLMConfig.tiny().llm
    empty = KVCache.empty(cfg, 2, 128)
    cache = KVCache(empty.k + 1, empty.v + 2, empty.valid.at[:, :100].set(True), jnp.asarray(100, jnp.int32))
    assert with_room(cache, 28) is cache
    grown = with_room(cache, 64)
    assert grown.capacity == CACHE_BUCKET and int(grown.end) == 100
    np.testing.assert_array_equal(grown.valid[:, :128], cache.valid)
    assert not grown.valid[:, 128:].any() and grown.k.shape[2] == grown.v.shape[2] == CACHE_BUCKET
    np.testing.assert_array_equal(grown.k[:, :, :128], cache.k)
    np.testing.assert_array_equal(grown.v[:, :, :128], cache.v)
