"""A tiny SegLLM release folder -> convert -> load -> 4-round scripted chat, three ways that must agree."""

from __future__ import annotations

import json

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


def test_batched_infer_matches_sessions(tiny, tmp_path):
    """`segllm-jax infer` batches conversations per round; each answer equals its own session's."""
    root, loaded = tiny
    other = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(other)
    convs = [(root / "scene.png", SCRIPT), (other, SCRIPT[:2]), (root / "scene.png", ["Segment it.[REF:3]"]),
             (tmp_path / "missing.png", SCRIPT[:1])]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": str(i), "queries": q}) for i, q in convs) + "\n")
    assert main(["infer", "--checkpoint", str(root / "converted"), "--manifest", str(manifest),
                 "--out", str(tmp_path / "out"), "--batch-size", "3"]) == 1  # two conversations fail
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "round 1" in results[2]["error"] and "does not exist" in results[3]["error"]
    for (image, queries), entry in zip(convs[:2], results[:2], strict=True):
        session = MultiRoundSession(loaded, image)
        assert entry["error"] is None and len(entry["rounds"]) == len(queries)
        for q, got in zip(queries, entry["rounds"], strict=True):
            want = session.ask(q)
            mask = np.asarray(Image.open(tmp_path / "out" / got["mask"])) > 0
            assert (mask == want.mask).mean() > 0.999
            np.testing.assert_allclose(got["box"], want.box, atol=0.02)
