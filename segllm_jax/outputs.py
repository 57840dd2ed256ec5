"""Writing results so that nobody's files are lost: output folders checked up front, files written atomically.

Why: a run that is interrupted (Ctrl-C, a full disk, a crash) must never leave a half-written
``results.json`` or PNG under its final name, where a later script would read it as complete. Every
file goes to a hidden temporary name in the same folder first and is renamed into place
(``os.replace`` is atomic on one file system). Output folders are checked before any model loads,
so a mistyped ``--out`` costs a second, not a model load.

Only the standard library and PIL: this module sits at the bottom of the package, next to ``errors``.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path

from segllm_jax.errors import InputError

# a file name we create from user data: no separators, no control characters, not "." or ".."
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")
MAX_NAME_LENGTH = 128


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` via a temporary sibling and a rename: all or nothing under ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(path: str | os.PathLike, image, format: str = "PNG") -> Path:
    """Saves a PIL image atomically (encoded in memory first, so a failed encode writes nothing)."""
    buffer = io.BytesIO()
    image.save(buffer, format)
    return atomic_write_bytes(path, buffer.getvalue())


def check_output_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuses an output path that cannot become a folder (a file, or a file on the way), without creating it."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"is inside {p}, which is a file"
                raise InputError(f"{what} {path} {where}; pass a folder.")
            if not os.access(p, os.W_OK | os.X_OK):
                raise InputError(f"{what} {path} cannot be written ({p} is not writable); pass another folder.")
            break
    return path


def make_output_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """:func:`check_output_folder`, then creates the folder (and its parents)."""
    path = check_output_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{what} {path} cannot be created ({e.strerror}); pass another folder.") from None
    return path


def check_file_name(name: str, what: str) -> str:
    """``name`` as one safe path component (it names a folder we write), or one sentence saying why not."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{what} must be a non-empty string.")
    if name in (".", "..") or _UNSAFE_NAME.search(name) or name != name.strip():
        raise InputError(f"{what} {name[:40]!r} is not a safe file name (no '/', '\\', '..', control characters "
                         "or surrounding spaces).")
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(f"{what} is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed.")
    return name
