"""``segllm-jax chat``: multi-round segmentation from the terminal, like the original CLI (architecture.md §E3).

Interactive: choose an image, then type one query per round (``[REF:k]`` cites round k);
``clear history`` starts the conversation again, ``exit`` picks a new image, ``quit`` (or end of
input) leaves. Non-interactive: ``--script FILE`` with one query per line (the same commands work).
Each round writes ``round_<r>.png`` (overlay), ``round_<r>_mask.png`` and updates ``results.json``.
A bad input is reported in one sentence and the session goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, TextIO

from segllm_jax.checkpoint import Loaded
from segllm_jax.errors import SegLLMError
from segllm_jax.outputs import atomic_write_text, make_output_folder
from segllm_jax.session import MultiRoundSession, RoundResult, save_round

COMMANDS = ("clear history", "exit", "quit")


class ChatWriter:
    """Writes each round's pictures and keeps ``results.json`` up to date, each file atomically
    (an interrupted chat leaves complete files only)."""

    def __init__(self, out: Path, image_path: str):
        self.out = make_output_folder(out)
        self.results = {"image": image_path, "rounds": []}

    def write(self, session: MultiRoundSession, result: RoundResult) -> None:
        self.results["rounds"].append(save_round(result, session.image, self.out))
        atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2) + "\n")

    def reset(self) -> None:
        self.results["rounds"] = []


def _lines(stream: TextIO, prompt: Callable[[str], None], text: str) -> Iterator[str]:
    while True:
        prompt(text)
        line = stream.readline()
        if not line:
            return
        yield line.strip()


def run_chat(loaded: Loaded, image: str | None, lines: TextIO, out: Path, *, interactive: bool,
             mode: str = "incremental", echo: Callable[[str], None] = print) -> int:
    """The chat loop; returns the number of rounds that failed.

    Non-interactive, an unusable image raises its :class:`SegLLMError` (nothing to do without it);
    interactive, the sentence is shown and another image asked for."""
    ask = (lambda s: print(s, end="", flush=True)) if interactive else (lambda s: None)
    failures = 0
    while True:
        if image is None:
            image = next(_lines(lines, ask, "image path (or quit)> "), "quit")
            if image in ("quit", "exit", ""):
                return failures
        try:
            session = MultiRoundSession(loaded, image, mode=mode)
        except SegLLMError as e:
            if not interactive:
                raise
            echo(f"cannot use {image}: {e}")
            failures += 1
            image = None
            continue
        target = out if not interactive else out / Path(image).stem
        writer = ChatWriter(target, str(image))
        for line in _lines(lines, ask, f"round {len(session.rounds) + 1}> "):
            if not line:
                continue
            if line == "quit":
                return failures
            if line == "exit":
                break
            if line == "clear history":
                session.clear()
                writer.reset()
                echo("history cleared")
                continue
            try:
                result = session.ask(line)
            except SegLLMError as e:
                echo(f"round {len(session.rounds) + 1}: {e}")
                failures += 1
                continue
            writer.write(session, result)
            refs = f" refs={list(result.refs)}" if result.refs else ""
            echo(f"round {result.index}: {result.text!r}{refs} -> {int(result.mask.sum())} px, "
                 f"box {[round(float(v), 1) for v in result.box]}, score {result.score:.3f} "
                 f"[{target / f'round_{result.index}.png'}]")
        else:
            return failures  # end of input
        image = None
