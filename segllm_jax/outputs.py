"""Writing results so that nobody's files are lost: output folders checked up front, files written atomically.

Why: a run that is interrupted (Ctrl-C, a full disk, a crash) must never leave a half-written
``results.json`` or PNG under its final name, where a later script would read it as complete. Every
file goes to a hidden temporary name in the same folder first and is renamed into place
(``os.replace`` is atomic on one file system). Output folders are checked before any model loads,
so a mistyped ``--out`` costs a second, not a model load.

Whole output folders (``convert``, ``export``, ``make-conversations``) follow :func:`check_destination`
and :func:`written_atomically`: ``convert X X`` once rewrote X's own ``config.json`` and died, leaving X
unconvertible, and a destination holding a ``config.json`` was silently replaced. The rules:

* DST must not be, contain or lie inside any source (not even with ``--overwrite``);
* DST must not exist as a file, and an existing non-empty DST folder is refused unless
  ``overwrite`` is given;
* the folder is written into a hidden temporary sibling of DST and moved into place only when
  complete; with ``overwrite`` the old DST is swapped out and deleted after the new one is in place.

Only the standard library and PIL: this module sits at the bottom of the package, next to ``errors``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Sequence

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


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_destination(dst: str | os.PathLike, sources: Sequence[str | os.PathLike], overwrite: bool = False) -> Path:
    """Refuses a DST that would destroy or mix with something the user owns (one sentence saying why)."""
    dst = Path(dst)
    target = dst.resolve()
    for src in sources:
        source = Path(src).resolve()
        if _overlaps(target, source):
            relation = ("is the source" if target == source else
                        "is inside the source" if source in target.parents else "contains the source")
            raise InputError(f"the output folder {dst} {relation} {src}; choose a folder outside it.")
    if dst.exists() and not dst.is_dir():
        raise InputError(f"the output folder {dst} is a file; choose a new folder.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise InputError(f"the output folder {dst} exists and is not empty; choose a new folder, or pass "
                         "--overwrite to replace it.")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"the output folder {dst} is inside {parent}, which is a file; choose another folder.")
    return dst


@contextlib.contextmanager
def written_atomically(dst: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary sibling of ``dst`` to write into; on success it becomes ``dst``.

    On any failure the temporary folder is removed and ``dst`` is untouched. An existing ``dst``
    (empty, or replaced on purpose with ``--overwrite``) is moved aside first and deleted last, so
    at every moment ``dst`` is either the old folder or the complete new one.
    """
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.writing-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        old = dst.parent / f".{dst.name}.replaced-{tag}"
        if dst.exists():
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            if old.exists():
                os.replace(old, dst)  # put the user's folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
