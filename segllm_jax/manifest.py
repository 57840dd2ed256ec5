"""``segllm-jax infer``'s manifest: JSON lines ``{"image": PATH, "queries": [...], "id": NAME}``, checked.

Why a module of its own: the CLI checks the whole manifest before the model loads (a bad line 9,000
should not cost a model load first), so this must not import JAX. Ids name output folders, so they
must be plain, unique file names: ``"../victim"`` would write outside ``--out``, and two equal ids
would overwrite each other's masks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from segllm_jax.errors import InputError
from segllm_jax.outputs import check_file_name


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    id: str
    image: str
    queries: list[str]


MANIFEST_FIELDS = ("image", "queries", "id")
RESULTS = "results.json"


def _manifest_entry(entry: object, where: str) -> tuple[str, list[str], str | None]:
    """(image, queries, id) of one manifest line, every field's type checked."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a JSON object {{\"image\": PATH, \"queries\": [...]}}, "
                         f"not {type(entry).__name__}.")
    unknown = sorted(set(entry) - set(MANIFEST_FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
                         f"{', '.join(MANIFEST_FIELDS)}.")
    image, queries = entry.get("image"), entry.get("queries")
    if not isinstance(image, str) or not image.strip():
        raise InputError(f"{where}: \"image\" must be a non-empty path string.")
    if not isinstance(queries, list) or not queries:
        raise InputError(f"{where}: \"queries\" must be a non-empty list of strings (one per round), "
                         f"not {type(queries).__name__}.")
    bad = [i + 1 for i, q in enumerate(queries) if not isinstance(q, str)]
    if bad:
        raise InputError(f"{where}: \"queries\" entries must be strings (entry {bad[0]} is not).")
    name = entry.get("id")
    if name is not None:
        check_file_name(name, f"{where}: \"id\"")
        if name.casefold() == RESULTS:
            raise InputError(f"{where}: \"id\" {name!r} would collide with {RESULTS}; choose another.")
    return image, queries, name


def _default_id(n: int, image: str) -> str:
    """``<line>_<image stem>``, or just ``<line>`` when the stem is not a safe file name."""
    try:
        return check_file_name(f"{n:05d}_{Path(image).stem}", "id")
    except InputError:
        return f"{n:05d}"


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """The manifest's conversations, checked completely before any work starts: one sentence (with the
    line number) for the first bad line, a repeated id, or an empty manifest."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the manifest {path}: {e.strerror}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path} is not UTF-8 text (line {line}); save it as UTF-8.") from None
    items: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}).") from None
        image, queries, name = _manifest_entry(entry, where)
        name = name or _default_id(n, image)
        if name.casefold() in seen:
            raise InputError(f"{where}: id {name!r} repeats line {seen[name.casefold()]}; ids name output "
                             "folders and must be unique.")
        seen[name.casefold()] = n
        items.append(ManifestEntry(name, image, queries))
    if not items:
        raise InputError(f"{path} holds no conversations; write one JSON object per line.")
    return items
