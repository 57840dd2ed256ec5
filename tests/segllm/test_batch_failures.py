"""Batch commands isolate failures; convert --overwrite swaps a complete checkpoint in; long questions
give short sentences. (In-process: these need the model, which the session's ``tiny`` has compiled.)"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import segllm_jax
from segllm_jax.apps.cli import main
from segllm_jax.data import mrshapes
from segllm_jax.errors import InputError
from segllm_jax.session import MultiRoundSession

from .conftest import golden_segllm_dir

pytestmark = pytest.mark.skipif(not (golden_segllm_dir() / "state_dict_keys.json").exists(),
                                reason="the tiny checkpoint's key list comes from ../shared/golden/segllm")


def test_infer_records_bad_items_and_goes_on(tiny, tmp_path, capsys):
    """A 1x5000 strip first, a text file posing as a PNG, a bad reference: each is recorded with its id;
    the good conversation is complete; exit code 1 says some failed."""
    root, _ = tiny
    Image.new("RGB", (5000, 1), (9, 9, 9)).save(tmp_path / "strip.png")
    (tmp_path / "notes.png").write_text("not a picture")
    lines = [{"image": str(tmp_path / "strip.png"), "queries": ["Segment it."], "id": "strip"},
             {"image": str(tmp_path / "notes.png"), "queries": ["Segment it."], "id": "notes"},
             {"image": str(root / "scene.png"), "queries": ["Segment it.", "Segment its neighbour.[REF:2]"],
              "id": "bad-ref"},
             {"image": str(root / "scene.png"), "queries": ["Segment the red square.", "And next to it.[REF:1]"],
              "id": "good"}]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(root / "converted"), "--manifest", str(manifest), "--out", str(out),
                 "--batch-size", "4"]) == 1
    results = {r["id"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(results) == ["strip", "notes", "bad-ref", "good"]
    assert "elongated" in results["strip"]["error"] and "not a picture" in results["notes"]["error"]
    assert "round 2" in results["bad-ref"]["error"] and len(results["bad-ref"]["rounds"]) == 1
    assert results["good"]["error"] is None and len(results["good"]["rounds"]) == 2
    assert sorted(p.name for p in (out / "good").iterdir()) == ["round_1.png", "round_1_mask.png",
                                                               "round_2.png", "round_2_mask.png"]
    assert not list(out.rglob(".*")), "a temporary file was left behind"
    assert "strip: " in capsys.readouterr().err


def test_eval_records_bad_conversations_and_goes_on(tiny, tmp_path):
    root, _ = tiny
    split = tmp_path / "mr"
    mrshapes.write_split(split, "test", 3, seed=11, max_rounds=2)
    entries = json.loads((split / "conversations" / "mrshapes_test.json").read_text())
    images = sorted((split / "images").rglob("*.png"))
    images[0].write_text("damaged")  # one conversation's picture is broken
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(root / "converted"), "--data", f"mrshapes:{split}:test",
                 "--out", str(out), "--mode", "teacher"]) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    (failed,) = metrics["teacher"]["failed"]
    assert failed["id"] in {e["id"] for e in entries} and "not a picture" in failed["error"]
    assert metrics["teacher"]["n_round0"] == len(entries) - 1
    assert sorted(p.name for p in out.iterdir()) == ["iou_per_round.png", "metrics.json", "metrics.md"]


def test_eval_refuses_when_nothing_can_be_evaluated(tiny, tmp_path, capsys):
    root, _ = tiny
    split = tmp_path / "mr"
    mrshapes.write_split(split, "test", 1, seed=3, max_rounds=2)
    shutil.rmtree(split / "images")
    (split / "images").mkdir()
    assert main(["eval", "--checkpoint", str(root / "converted"), "--data", f"mrshapes:{split}:test",
                 "--out", str(tmp_path / "eval"), "--mode", "teacher"]) == 2
    assert "no conversation could be evaluated" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_convert_overwrite_swaps_in_a_complete_checkpoint(tiny, tmp_path):
    root, _ = tiny
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text('{"mine": true}')
    (dst / "notes.txt").write_text("old")
    assert main(["convert", str(root / "release"), str(dst), "--quiet"]) == 2  # refused without --overwrite
    assert (dst / "notes.txt").read_text() == "old"
    assert main(["convert", str(root / "release"), str(dst), "--overwrite", "--quiet"]) == 0
    assert not (dst / "notes.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert segllm_jax.load(dst).kind == "segllm"


def test_a_failed_conversion_leaves_the_destination_alone(tiny, tmp_path, monkeypatch):
    """Interrupted after the parameters were written: DST is still the user's old folder, no temporary left."""
    import segllm_jax_convert.convert as convert_module

    root, _ = tiny
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("old")

    def broken_copy(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module.shutil, "copy2", broken_copy)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert_checkpoint(root / "release", dst, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"] and (dst / "notes.txt").read_text() == "old"


def test_a_long_question_gets_a_short_sentence(tiny):
    root, loaded = tiny
    session = MultiRoundSession(loaded, root / "scene.png")
    question = "Segment the red square " * 1000  # ~23,000 characters
    with pytest.raises(InputError) as error:
        session.ask(question + "[REF:1]")
    assert len(str(error.value)) < 300 and re.search(r"\(\d{5} characters\)", str(error.value))
    with pytest.raises(InputError) as error:
        session.ask(question)
    message = str(error.value)
    assert len(message) < 300 and message.count("shorten") == 1 and message.count("clear") <= 1
    assert not session.rounds  # refused rounds leave the session as it was


def test_chat_script_reports_failed_rounds_and_exits_1(tiny, tmp_path, capsys):
    root, _ = tiny
    script = tmp_path / "q.txt"
    script.write_text("Segment it.\nSegment the next one.[REF:3]\n")
    out = tmp_path / "out"
    assert main(["chat", "--checkpoint", str(root / "converted"), "--image", str(root / "scene.png"),
                 "--script", str(script), "--out", str(out)]) == 1
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) == 1 and "only 1 earlier round" in capsys.readouterr().out
    assert not list(out.glob(".*"))
    assert np.asarray(Image.open(out / "round_1_mask.png")).shape == (48, 80)
