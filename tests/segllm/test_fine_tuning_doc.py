"""``docs/fine_tuning.md``, run: every command of its ``bash`` blocks, in the doc's order, exactly as written.

The test builds what the doc assumes, under the doc's own relative paths in a temporary folder: the tiny
release of the session (``tiny_release.py``, fixture ``tiny``) as ``SegLLM/all_data_checkpoint/`` and a COCO file
of MR-Shapes scenes (``tests/data/coco_fixture.py``) as ``my_data/``. Training runs with ``SEGLLM_PRESET=cpu`` (the
preset the doc names for this check), ``eval`` with ``--limit 1 --mode teacher``; a command that needs a pod
(``SEGLLM_DISTRIBUTED``) has its config loaded and checked instead of run. If the doc gains a command, the
test runs it; if the doc drops one, the command lists below fail.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from segllm_jax.apps import cli

from .conftest import golden_segllm_dir

pytestmark = pytest.mark.skipif(not (golden_segllm_dir() / "state_dict_keys.json").exists(),
                                reason="the tiny release's key list comes from ../shared/golden/segllm")

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "fine_tuning.md"
FAST = {"eval": ["--limit", "1", "--mode", "teacher"]}  # the test's only additions to the doc's commands


def doc_commands() -> list[tuple[dict[str, str], list[str]]]:
    """(environment, argv after ``segllm-jax``) of every command line in the doc's bash blocks, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if words:
                assert words[0] == "segllm-jax", f"not a segllm-jax command in the doc: {line}"
                commands.append((env, words[1:]))
    return commands


def test_the_doc_covers_the_whole_walk_through():
    names = [argv[0] for _, argv in doc_commands()]
    assert names == ["convert", "make-conversations", "make-conversations", "train", "train", "eval", "eval",
                     "export"]


def write_inputs(root: Path, release: Path) -> None:
    """What the doc starts from, at the doc's paths under ``root`` (the release is the session's tiny one,
    linked: the commands only read it)."""
    from data.coco_fixture import write_coco

    (root / "SegLLM").mkdir()
    (root / "SegLLM" / "all_data_checkpoint").symlink_to(release, target_is_directory=True)
    for split, n in (("train", 6), ("val", 2)):
        path, _ = write_coco(root / "my_data", split, n)
        path.rename(root / "my_data" / f"instances_{split}.json")
    (root / "configs").symlink_to(REPO / "configs")


def check_pod_config(env: dict[str, str], argv: list[str], monkeypatch) -> None:
    """A multi-host command on one machine: its config loads, with one FSDP mesh over every device."""
    from segllm_jax.train.loop import load_config

    for key, value in env.items():
        if key != "SEGLLM_DISTRIBUTED":
            monkeypatch.setenv(key, value)
    config = load_config(argv[argv.index("--config") + 1])
    assert config.mesh_shape == (1, -1, 1) and config.init_checkpoint == env["SEGLLM_INIT"]


def run(env: dict[str, str], argv: list[str], monkeypatch) -> None:
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        if argv[0] == "train":
            m.setenv("SEGLLM_PRESET", "cpu")
        assert cli.main(argv + FAST.get(argv[0], [])) == 0, argv


def test_every_command_of_the_walk_through_runs(tiny, tmp_path, monkeypatch, capsys):
    write_inputs(tmp_path, tiny[0] / "release")
    monkeypatch.chdir(tmp_path)
    for env, argv in doc_commands():
        if "SEGLLM_DISTRIBUTED" in env:
            check_pod_config(env, argv, monkeypatch)
        else:
            run(env, argv, monkeypatch)

    report = json.loads(Path("conversations/train/report.json").read_text())
    assert report["conversations"] >= 6 and report["images"]["skipped"] == 0
    assert "conversations" in capsys.readouterr().out
    metrics = json.loads(Path("runs/fine_tune/eval/metrics.json").read_text())
    assert metrics["teacher"]["n_round0"] == 1
    assert Path("runs/before_fine_tuning/metrics.json").is_file()

    # the exported release starts from the converted one (frozen weights identical) and was trained
    from segllm_jax_convert.io import open_checkpoint

    release, exported = open_checkpoint(Path("SegLLM/all_data_checkpoint")), open_checkpoint(Path("exported"))
    assert set(exported) == set(release)
    frozen, trained = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(exported.load(frozen), release.load(frozen))
    assert not np.array_equal(exported.load(trained), release.load(trained))

    # the doc's plain train command (no SEGLLM_PRESET) gets the one-GPU preset: the released recipe on one device
    from segllm_jax.train.loop import load_config

    train_env = next(env for env, argv in doc_commands() if argv[0] == "train" and "SEGLLM_PRESET" not in env)
    for key, value in train_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SEGLLM_PRESET", raising=False)
    config = load_config(REPO / "configs" / "fine_tune.py")
    assert (config.mesh_shape, config.batch_size, config.compute_dtype, config.remat) == \
        ((1, 1, 1), 4, "bfloat16", "full")
    assert config.use_hipie_loss and config.learning_rate == 2e-6 and config.init_checkpoint == "converted"
