"""What ``segllm-jax eval --data`` names, checked without loading a model.

Kept apart from :mod:`segllm_jax.eval.evaluate` (which imports JAX) so the CLI can refuse a mistyped
folder or split in a fraction of a second, before the checkpoint is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from segllm_jax.data.conversations import read_conversations
from segllm_jax.data.mixture import ConversationFile, MixtureConfig
from segllm_jax.data.registers import RegisterSpec
from segllm_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class EvalData(MixtureConfig):
    """The mixture ``--data`` names: conversation files, their annotation registers and images folder
    (evaluation reads the ``<dataset>_eval`` registers where present)."""

    annotations_root: str = "."
    is_eval: bool = True

    @classmethod
    def parse(cls, spec: str) -> "EvalData":
        """``mrshapes:DIR:SPLIT`` (a folder written by ``mrshapes.write_split``) or a JSON file with the fields."""
        if spec.startswith("mrshapes:"):
            parts = spec.split(":", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise InputError(f"--data {spec!r}: write mrshapes:DIR:SPLIT (e.g. mrshapes:data:test).")
            _, folder, split = parts
            root = Path(folder)
            if not root.is_dir():
                raise InputError(f"--data {spec!r}: {folder}: no such folder; write it with "
                                 "`segllm-jax make-mrshapes --out DIR`.")
            if not (root / "conversations" / f"mrshapes_{split}.json").is_file():
                files = (root / "conversations").glob("mrshapes_*.json")
                found = sorted(f.stem.removeprefix("mrshapes_") for f in files)
                raise InputError(f"--data {spec!r}: {folder} has no split {split!r} (it has: "
                                 f"{', '.join(found) or 'none'}).")
            register = root / "annotations" / f"mrshapes_{split}.json"
            return cls((ConversationFile(str(root / "conversations" / f"mrshapes_{split}.json")),),
                       (RegisterSpec("mrshapes", str(register)),), str(root / "images"))
        try:
            d = json.loads(Path(spec).read_text())
            return cls(tuple(ConversationFile(str(c)) for c in d["conversations"]),
                       tuple(RegisterSpec(**r) for r in d["registers"]),
                       d["images_root"], d.get("annotations_root", "."))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"--data {spec!r}: expected mrshapes:DIR:SPLIT or a JSON file with conversations, "
                             f"registers and images_root ({type(e).__name__}).") from None

    def check(self) -> "EvalData":
        """Every named file and folder exists (cheap; before a model is loaded)."""
        for path in (*self.paths, *(r.path for r in self.registers)):
            if not Path(path).is_file():
                raise InputError(f"--data: {path}: no such file.")
        if not Path(self.images_root).is_dir():
            raise InputError(f"--data: the images folder {self.images_root} does not exist.")
        return self


def read_entries(path: str | Path, limit: int | None) -> list[dict]:
    """The first ``limit`` conversations of a file; an unreadable file is one sentence."""
    try:
        return read_conversations(path)[:limit]
    except (OSError, ValueError, AttributeError, TypeError) as e:  # JSON / UTF-8 errors are ValueErrors
        raise InputError(f"{path} is not a readable conversation file ({type(e).__name__}: {str(e)[:120]}).") \
            from None
