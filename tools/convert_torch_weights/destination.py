"""Where a conversion writes: never over the user's files, never half a checkpoint under the final name.

Why: ``convert X X`` once rewrote X's own ``config.json`` and died, leaving X unconvertible, and a
destination holding a ``config.json`` was silently replaced. The rules:

* DST must not be, contain or lie inside any source (not even with ``--overwrite``);
* DST must not exist as a file, and an existing non-empty DST folder is refused unless
  ``overwrite`` is given;
* the checkpoint is written into a hidden temporary sibling of DST and moved into place only when
  complete; with ``overwrite`` the old DST is swapped out and deleted after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from segllm_jax.errors import InputError


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
    tmp = dst.parent / f".{dst.name}.converting-{tag}"
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
