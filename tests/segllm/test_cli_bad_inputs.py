"""Every subcommand, run as a user would (a subprocess), on bad input: exit code 2, one sentence, no
traceback, and nothing changed on disk (inputs hashed before and after; no output appears).

The table is the issue's list of measured failures plus what a tired user or an attacker would try.
All probes share the session's tiny checkpoint (``tiny``: release folder, converted folder, scene);
a probe that needs a damaged or occupied copy builds it in its own workspace. Most probes fail
before any model loads (that is part of the policy), so the whole table takes about a minute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from .conftest import golden_segllm_dir

pytestmark = pytest.mark.skipif(not (golden_segllm_dir() / "state_dict_keys.json").exists(),
                                reason="the tiny checkpoint's key list comes from ../shared/golden/segllm")

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Workspace:
    """A probe's own folder (its cwd) plus the shared tiny checkpoint (never written to)."""

    dir: Path
    release: Path
    converted: Path
    scene: Path

    def file(self, name: str, content: str | bytes) -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def image(self, name: str, width: int, height: int) -> str:
        path = self.dir / name
        Image.new("RGB", (width, height), (120, 30, 30)).save(path)
        return str(path)

    def damaged(self, edit: Callable[[Path], None]) -> str:
        """A copy of the converted checkpoint with ``edit`` applied."""
        copy = self.dir / "damaged"
        shutil.copytree(self.converted, copy)
        edit(copy)
        return str(copy)

    def config_edit(self, edit: Callable[[dict], object]) -> str:
        def apply(folder: Path) -> None:
            meta = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(edit(meta)))
        return self.damaged(apply)

    def manifest(self, *lines: object) -> str:
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
        return self.file("jobs.jsonl", text)


def _set(meta: dict, path: str, value) -> dict:
    node = meta
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return meta


def _truncate_params(folder: Path) -> None:
    for f in (folder / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty_params(folder: Path) -> None:
    for f in (folder / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


def _without_tokenizer(folder: Path) -> None:
    for f in folder.glob("tokenizer*"):
        f.unlink()


def _evil_pickle(ws: Workspace) -> str:
    import torch

    class RunsCode:
        def __reduce__(self):
            return (print, ("this checkpoint ran code",))

    torch.save({"w": torch.zeros(2), "payload": RunsCode()}, ws.dir / "evil.pth")
    return str(ws.dir / "evil.pth")


def _mrshapes(ws: Workspace) -> str:
    """An MR-Shapes folder with only a test split."""
    (ws.dir / "mr" / "conversations").mkdir(parents=True)
    (ws.dir / "mr" / "conversations" / "mrshapes_test.json").write_text("[]")
    return str(ws.dir / "mr")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source_with_config(ws: Workspace, config_text: str) -> str:
    """A source folder with a real (one-tensor) safetensors file and the given config.json."""
    from safetensors.numpy import save_file

    (ws.dir / "src").mkdir()
    save_file({"w": np.zeros(2, np.float32)}, ws.dir / "src" / "model.safetensors")
    (ws.dir / "src" / "config.json").write_text(config_text)
    return str(ws.dir / "src")


def _busy_port(ws: Workspace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    ws.busy = sock  # closed after the probe
    return sock.getsockname()[1]


# name -> (argv from the workspace, a fragment the one sentence must contain)
PROBES: dict[str, tuple[Callable[[Workspace], list[str]], str]] = {
    # ---- argument mistakes, caught by the parser --------------------------------------------------
    "no subcommand": (lambda ws: [], "required: command"),
    "unknown option": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--imge", "x.png"], "unrecognized"),
    "infer missing manifest": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", "nope.jsonl"],
                               "no such file"),
    "infer batch size 0": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest",
                                       ws.manifest({"image": "a.png", "queries": ["x"]}), "--batch-size", "0"],
                           "at least 1"),
    "infer batch size text": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest",
                                          ws.manifest({"image": "a.png", "queries": ["x"]}), "--batch-size", "8x"],
                              "not a whole number"),
    "eval limit 0": (lambda ws: ["eval", "--checkpoint", str(ws.converted), "--data", "mrshapes:x:test",
                                 "--limit", "0"], "at least 1"),
    "eval limit -1": (lambda ws: ["eval", "--checkpoint", str(ws.converted), "--data", "mrshapes:x:test",
                                  "--limit", "-1"], "at least 1"),
    "serve max sessions 0": (lambda ws: ["serve", "--checkpoint", str(ws.converted), "--max-sessions", "0"],
                             "at least 1"),
    "serve max upload -5": (lambda ws: ["serve", "--checkpoint", str(ws.converted), "--max-upload-mb", "-5"],
                            "above 0"),
    "serve idle timeout nan": (lambda ws: ["serve", "--checkpoint", str(ws.converted), "--idle-timeout", "nan"],
                               "finite"),
    "serve port out of range": (lambda ws: ["serve", "--checkpoint", str(ws.converted), "--port", "70000"],
                                "at most 65535"),
    "train missing config": (lambda ws: ["train", "--config", "nope.py", "--workdir", "w"], "no such file"),
    "train steps 0": (lambda ws: ["train", "--config", ws.file("c.py", "CONFIG = 1\n"), "--workdir", "w",
                                  "--steps", "0"], "at least 1"),
    "make-mrshapes negative split": (lambda ws: ["make-mrshapes", "--out", "mr", "--train", "-1"], "at least 0"),
    "chat script without image": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--script",
                                              ws.file("q.txt", "Segment it.\n"), "--out", "out"], "needs --image"),
    "chat missing image": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--image", "nope.png"],
                           "no such file"),
    # ---- convert: never destroys or mixes with the user's files -----------------------------------
    "convert into its own source": (lambda ws: ["convert", str(ws.release), str(ws.release)], "is the source"),
    "convert into a folder inside the source": (lambda ws: ["convert", str(ws.release), str(ws.release / "out")],
                                                "inside the source"),
    "convert into a folder around the source": (lambda ws: ["convert", str(ws.release), str(ws.release.parent)],
                                                "contains the source"),
    "convert over its source even with --overwrite": (lambda ws: ["convert", str(ws.release), str(ws.release),
                                                                  "--overwrite"], "is the source"),
    "convert into a non-empty folder": (lambda ws: ["convert", str(ws.release), str(Path(
        ws.file("dst/config.json", '{"mine": true}')).parent)], "--overwrite"),
    "convert into a file": (lambda ws: ["convert", str(ws.release), ws.file("dst.txt", "mine")], "is a file"),
    "convert a missing source": (lambda ws: ["convert", "no/such/release", "dst"], "no such file or folder"),
    "convert a truncated safetensors": (lambda ws: ["convert", ws.file("w.safetensors", b"\x10\x00"), "dst"],
                                        "truncated"),
    "convert a pickle that runs code": (lambda ws: ["convert", _evil_pickle(ws), "dst"], "refused"),
    "convert a folder without weights": (lambda ws: ["convert", str(Path(ws.file("src/notes.txt", "hi")).parent),
                                                     "dst"], "holds no checkpoint"),
    "convert with a list as config.json": (lambda ws: ["convert", _source_with_config(ws, "[1, 2]"), "dst"],
                                           "JSON object"),
    "convert with a config of the wrong types": (lambda ws: ["convert", _source_with_config(ws, json.dumps(
        {"model_type": "llama", "num_attention_heads": "four", "hidden_size": 64})), "dst"], "wrong type"),
    "training init without --clip": (lambda ws: ["convert", "--llava", str(ws.release), "--hipie",
                                                 ws.file("r50.pth", b""), "dst"], "needs --llava, --clip and --hipie"),
    # ---- check-conversion: a mistyped path is a path, never a hub id -----------------------------
    "check-conversion hub-like source": (lambda ws: ["check-conversion", "lmsys/vicuna-7b-v1.5", str(ws.converted)],
                                         "no such file or folder"),
    "check-conversion missing dst": (lambda ws: ["check-conversion", str(ws.release), "nope"], "no such folder"),
    # ---- damaged checkpoints: one sentence naming the file ----------------------------------------
    "checkpoint missing": (lambda ws: ["chat", "--checkpoint", "no/such/ckpt", "--image", str(ws.scene)],
                           "no such folder"),
    "checkpoint is a file": (lambda ws: ["chat", "--checkpoint", str(ws.scene), "--image", str(ws.scene)],
                             "is a file"),
    "checkpoint config not JSON": (lambda ws: ["chat", "--checkpoint", ws.damaged(
        lambda f: (f / "config.json").write_text("{not json")), "--image", str(ws.scene)], "not valid JSON"),
    "checkpoint config is a list": (lambda ws: ["chat", "--checkpoint", ws.damaged(
        lambda f: (f / "config.json").write_text("[]")), "--image", str(ws.scene)], "JSON object"),
    "checkpoint config is a folder": (lambda ws: ["chat", "--checkpoint", ws.damaged(
        lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir())), "--image", str(ws.scene)],
                                      "not a file"),
    "checkpoint config not UTF-8": (lambda ws: ["chat", "--checkpoint", ws.damaged(
        lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}")), "--image", str(ws.scene)], "UTF-8"),
    "checkpoint without kind": (lambda ws: ["chat", "--checkpoint", ws.config_edit(
        lambda m: {k: v for k, v in m.items() if k != "kind"}), "--image", str(ws.scene)], "kind None"),
    "checkpoint of another kind": (lambda ws: ["chat", "--checkpoint", ws.config_edit(
        lambda m: _set(m, "kind", "llama")), "--image", str(ws.scene)], "needs a segllm checkpoint"),
    "checkpoint field of the wrong type": (lambda ws: ["chat", "--checkpoint", ws.config_edit(
        lambda m: _set(m, "config.llm.hidden_size", "64")), "--image", str(ws.scene)], "hidden_size must be int"),
    "checkpoint field missing": (lambda ws: ["chat", "--checkpoint", ws.config_edit(
        lambda m: (m["config"]["vision"].pop("patch_size"), m)[1]), "--image", str(ws.scene)], "patch_size"),
    "checkpoint without params": (lambda ws: ["chat", "--checkpoint", ws.damaged(
        lambda f: shutil.rmtree(f / "params")), "--image", str(ws.scene)], "params is missing"),
    "checkpoint with emptied params": (lambda ws: ["chat", "--checkpoint", ws.damaged(_empty_params),
                                                   "--image", str(ws.scene)], "damaged"),
    "checkpoint with truncated params": (lambda ws: ["chat", "--checkpoint", ws.damaged(_truncate_params),
                                                     "--image", str(ws.scene)], "damaged or truncated"),
    "checkpoint without tokenizer": (lambda ws: ["chat", "--checkpoint", ws.damaged(_without_tokenizer),
                                                 "--image", str(ws.scene)], "no tokenizer files"),
    # ---- chat ----------------------------------------------------------------------------------
    "chat on a 1x5000 image": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--image",
                                           ws.image("strip.png", 5000, 1), "--script",
                                           ws.file("q.txt", "Segment it.\n"), "--out", "out"], "elongated"),
    "chat on a text file": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--image",
                                        ws.file("notes.png", "not a picture"), "--out", "out"], "not a picture"),
    "chat on an absurd PNG header": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--image",
                                                 ws.file("bomb.png", _png_header(100_000, 100_000)), "--out", "out"],
                                     "pixels"),
    "chat script not UTF-8": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--image", str(ws.scene),
                                          "--script", ws.file("q.txt", b"Segment it.\n\xff\xfe\n"), "--out", "out"],
                              "not UTF-8 text (line 2)"),
    "chat out is a file": (lambda ws: ["chat", "--checkpoint", str(ws.converted), "--image", str(ws.scene),
                                       "--script", ws.file("q.txt", "Segment it.\n"), "--out", ws.file("out", "")],
                           "is a file"),
    # ---- infer: the manifest is checked before anything runs -------------------------------------
    "infer id escapes --out": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"], "id": "../victim"}), "--out", "out"], "not a safe file name"),
    "infer id is dot-dot": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"], "id": ".."}), "--out", "out"], "not a safe file name"),
    "infer id is absolute": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"], "id": "/tmp/x"}), "--out", "out"], "not a safe file name"),
    "infer id is a number": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"], "id": 7}), "--out", "out"], "non-empty string"),
    "infer id names results.json": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest",
                                                ws.manifest({"image": str(ws.scene), "queries": ["x"],
                                                             "id": "results.json"}), "--out", "out"], "collide"),
    "infer duplicate ids": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"], "id": "a"}, {"image": str(ws.scene), "queries": ["y"], "id": "a"}),
        "--out", "out"], "repeats line 1"),
    "infer queries is a string": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": "Segment it."}), "--out", "out"], "non-empty list of strings"),
    "infer queries hold a number": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest",
                                                ws.manifest({"image": str(ws.scene), "queries": ["a", 3]}),
                                                "--out", "out"], "entry 2 is not"),
    "infer misspelled field": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "query": ["x"]}), "--out", "out"], "unknown field"),
    "infer line not JSON": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"]}, "{oops"), "--out", "out"], "line 2: not valid JSON"),
    "infer empty manifest": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest",
                                         ws.file("jobs.jsonl", "\n\n"), "--out", "out"], "holds no conversations"),
    "infer manifest not UTF-8": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest",
                                             ws.file("jobs.jsonl", b'{"image": "\xff"}\n'), "--out", "out"], "UTF-8"),
    "infer out is a file": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"]}), "--out", ws.file("out", "")], "is a file"),
    "infer out under a file": (lambda ws: ["infer", "--checkpoint", str(ws.converted), "--manifest", ws.manifest(
        {"image": str(ws.scene), "queries": ["x"]}), "--out", ws.file("f", "") + "/out"], "which is a file"),
    # ---- eval ----------------------------------------------------------------------------------
    "eval missing mrshapes folder": (lambda ws: ["eval", "--checkpoint", str(ws.converted), "--data",
                                                 "mrshapes:no/such:test", "--out", "out"], "no such folder"),
    "eval missing split": (lambda ws: ["eval", "--checkpoint", str(ws.converted), "--data",
                                       f"mrshapes:{_mrshapes(ws)}:tset", "--out", "out"], "no split 'tset'"),
    "eval spec without split": (lambda ws: ["eval", "--checkpoint", str(ws.converted), "--data", "mrshapes:x",
                                            "--out", "out"], "mrshapes:DIR:SPLIT"),
    "eval data file not JSON": (lambda ws: ["eval", "--checkpoint", str(ws.converted), "--data",
                                            ws.file("data.json", "{"), "--out", "out"], "expected mrshapes"),
    "eval data names missing files": (lambda ws: ["eval", "--checkpoint", str(ws.converted), "--data", ws.file(
        "data.json", json.dumps({"conversations": ["c.json"], "registers": [{"name": "m", "path": "r.json"}],
                                 "images_root": "."})), "--out", "out"], "c.json: no such file"),
    # ---- serve, train, make-mrshapes, demo -----------------------------------------------------
    "serve on a busy port": (lambda ws: ["serve", "--checkpoint", str(ws.converted), "--port", str(_busy_port(ws))],
                             "pick another --port"),
    "serve a damaged checkpoint": (lambda ws: ["serve", "--checkpoint", ws.damaged(_without_tokenizer), "--port",
                                               str(_free_port())], "no tokenizer files"),
    "train config with a syntax error": (lambda ws: ["train", "--config", ws.file("c.py", "CONFIG = (\n"),
                                                     "--workdir", "w"], "c.py, line"),
    "make-mrshapes out is a file": (lambda ws: ["make-mrshapes", "--out", ws.file("mr", ""), "--train", "1"],
                                    "is a file"),
    "demo missing checkpoint": (lambda ws: ["demo", "--checkpoint", "no/such", "--out", "out"], "no such folder"),
    # ---- make-conversations: nothing usable, an OUT inside the images (the rest: tests/data) -------------
    "make-conversations nothing usable": (lambda ws: _conversations(ws, json.dumps(
        {"images": [{"id": 1, "file_name": "gone.png", "height": 8, "width": 8}], "annotations": [],
         "categories": []})), "no conversation could be made"),
    "make-conversations out inside images": (lambda ws: _conversations(ws, "{}", out="images/conv"),
                                             "inside the source"),
}


def _conversations(ws: Workspace, coco: str, out: str = "conv") -> list[str]:
    (ws.dir / "images").mkdir(exist_ok=True)
    return ["make-conversations", "--coco", ws.file("c.json", coco), "--images", str(ws.dir / "images"),
            "--out", out]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (the data is tiny and never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def snapshot(*roots: Path) -> dict[str, str | None]:
    """path -> sha256 of every file (None for folders) under ``roots``: any change, addition or removal shows."""
    out: dict[str, str | None] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def run_cli(argv: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is enough here
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "segllm_jax.apps.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_sentence(result: subprocess.CompletedProcess, command: str, fragment: str) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, f"exit code {result.returncode}: {output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {result.stderr}"
    sentence = lines[0]
    assert sentence.startswith("segllm-jax") and (not command or f" {command}:" in sentence
                                                  or "unrecognized" in sentence), sentence
    assert sentence.endswith(".") and len(sentence) < 400, sentence
    assert fragment in sentence, f"{fragment!r} not in {sentence!r}"
    assert "weights_only=False" not in sentence and "Python" not in sentence, sentence
    assert not result.stdout.strip(), f"nothing on stdout for a refused command: {result.stdout}"
    return sentence


@pytest.fixture(scope="module")
def shared(tiny):
    root, _ = tiny
    return root


@pytest.mark.parametrize("name", list(PROBES))
def test_bad_input_is_one_sentence_and_changes_nothing(name, shared, tmp_path):
    build, fragment = PROBES[name]
    ws = Workspace(tmp_path, shared / "release", shared / "converted", shared / "scene.png")
    argv = build(ws)
    before = snapshot(tmp_path, shared)
    try:
        result = run_cli(argv, cwd=tmp_path)
    finally:
        if getattr(ws, "busy", None):
            ws.busy.close()
    command = next((a for a in argv if not a.startswith("-")), "") if argv else ""
    assert_one_sentence(result, command, fragment)
    after = snapshot(tmp_path, shared)
    assert after == before, ("files changed, appeared or vanished: "
                             f"{sorted(set(after.items()) ^ set(before.items()))[:5]}")


def test_debug_shows_the_traceback(shared, tmp_path):
    result = run_cli(["--debug", "chat", "--checkpoint", "no/such/ckpt", "--image", str(shared / "scene.png")],
                     cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr
    after_subcommand = run_cli(["chat", "--checkpoint", "no/such/ckpt", "--debug"], cwd=tmp_path)
    assert "Traceback" in after_subcommand.stderr


def test_edge_checks_run_before_the_model_loads(shared, tmp_path):
    """A refused command costs about a second: nothing heavy (JAX, orbax, torch, Gradio) is imported."""
    (tmp_path / "notes.png").write_text("not a picture")
    code = ("import sys; from segllm_jax.apps.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('jax', 'orbax', 'torch', 'gradio', 'transformers') if m in sys.modules]; "
            "print(rc, heavy)")
    for argv in (["chat", "--checkpoint", str(shared / "converted"), "--image", "notes.png"],
                 ["infer", "--checkpoint", str(shared / "converted"), "--manifest", "notes.png"],
                 ["serve", "--checkpoint", str(shared / "release"), "--port", str(_free_port())]):
        probe = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
        assert probe.stdout.strip() == "2 []", probe.stdout + probe.stderr
