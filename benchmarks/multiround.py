"""Round latency of ``MultiRoundSession``: incremental (KV cache) vs recompute (the original's way).

    python benchmarks/multiround.py                    # tiny config, CPU-friendly
    python benchmarks/multiround.py --config 7b        # SegLLM-7B shapes, random bf16 weights (GPU)
    python benchmarks/multiround.py --batch 8          # + N conversations: batched infer vs sessions

Each mode first runs one untimed warm-up conversation with the same rounds (so every shape is
compiled), then a timed one; the table gives milliseconds per round, the speed-up of incremental
over recompute in the same run, and peak memory (device peak on accelerators, process RSS on CPU).
Every other round cites an earlier one with ``[REF:k]``.

``--batch N`` adds a second table: N conversations (each its own image; conversation i starts its
questions at the 2i-th, so their lengths differ) run as one ``segllm-jax infer`` group with the KV
cache (batched-incremental), as one group rebuilt from the first token every round
(batched-recompute: ``infer`` before the cache, the baseline of the ratios), and as N sessions one
after the other (sequential sessions). Each mode runs once untimed, then timed: conversations per
second, and per-round latency (one round step: the whole group's for the batched modes, one
``ask`` for the sessions; round 1 includes the per-image work, CLIP and HIPIE's backbone).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from segllm_jax import checkpoint
from segllm_jax.apps.infer import Conversation, infer_group
from segllm_jax.config import SegLLMConfig
from segllm_jax.data.tiny_tokenizer import train_tokenizer
from segllm_jax.prompt import SYSTEM_PROMPT
from segllm_jax.session import MultiRoundSession
from segllm_jax.tokenizer import SegTokenizer

QUESTIONS = ["Segment the person on the left.", "Segment the object {ref} is holding.",
             "Segment the largest animal.", "Segment what is next to {ref}.", "Segment the red car.",
             "Segment the shadow of {ref}.", "Segment the tallest tree.", "Segment whatever touches {ref}."]


def _peak_memory_mb() -> float:
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _questions(rounds: int, first: int = 0) -> list[str]:
    out = []
    for r in range(rounds):
        q = QUESTIONS[(first + r) % len(QUESTIONS)]
        out.append(q.format(ref=f"instance {r}") + (f"[REF:{r}]" if "{ref}" in q else ""))
    return out


def _loaded(config: str, folder: Path) -> checkpoint.Loaded:
    train_tokenizer([SYSTEM_PROMPT + " USER: ASSISTANT:", *QUESTIONS], folder)
    tokenizer = SegTokenizer.from_pretrained(folder)
    if config == "7b":
        cfg = SegLLMConfig.segllm_7b(vocab_size=tokenizer.vocab_size)
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, param_dtype="bfloat16", dtype="bfloat16"),
                                  vision=dataclasses.replace(cfg.vision, param_dtype="bfloat16", dtype="bfloat16"))
    else:
        cfg = SegLLMConfig.tiny(vocab_size=tokenizer.vocab_size)
    model = checkpoint.build_model("segllm", cfg)
    return checkpoint.Loaded("segllm", cfg, model, tokenizer, folder)


def _run(loaded, image: np.ndarray, mode: str, questions: list[str]) -> list[float]:
    session = MultiRoundSession(loaded, image, mode=mode)
    times = []
    for q in questions:
        t0 = time.perf_counter()
        session.ask(q)  # returns host NumPy: the device work is finished
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _run_sessions(loaded, images: list[Path], questions: list[list[str]]) -> tuple[float, list[list[float]]]:
    """Sequential sessions: (seconds, per conversation the ms of each round, round 1 with the session's setup)."""
    start, times = time.perf_counter(), []
    for image, qs in zip(images, questions, strict=True):
        t0 = time.perf_counter()
        session = MultiRoundSession(loaded, image)
        rounds = []
        for q in qs:
            session.ask(q)
            t1 = time.perf_counter()
            rounds.append((t1 - t0) * 1e3)
            t0 = t1
        times.append(rounds)
    return time.perf_counter() - start, times


def _run_group(loaded, images: list[Path], questions: list[list[str]], mode: str) -> tuple[float, list[float]]:
    """One infer group: (seconds, ms of each round step, round 1 with the per-image work)."""
    group = [Conversation(str(i), str(image), qs) for i, (image, qs) in enumerate(zip(images, questions, strict=True))]
    marks = [time.perf_counter()]
    infer_group(loaded, group, mode=mode, on_round=lambda _: marks.append(time.perf_counter()))  # host NumPy: done
    assert not any(c.error for c in group), [c.error for c in group]
    return marks[-1] - marks[0], list(np.diff(marks) * 1e3)


def batched_table(loaded, folder: Path, batch: int, rounds: int) -> list[str]:
    """The ``--batch`` table: N conversations, batched-incremental and sequential sessions against batched-recompute."""
    rng = np.random.default_rng(1)
    images = []
    for i in range(batch):
        images.append(folder / f"image_{i}.png")
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(images[-1])
    questions = [_questions(rounds, first=2 * i) for i in range(batch)]  # round 1 never cites
    runs = {}
    for mode in ("batched-incremental", "batched-recompute", "sequential sessions"):
        for _ in range(2):  # warm-up (compiles every shape), then timed
            if mode == "sequential sessions":
                seconds, per_conv = _run_sessions(loaded, images, questions)
                runs[mode] = seconds, [float(np.mean(r)) for r in zip(*per_conv, strict=True)]
            else:
                runs[mode] = _run_group(loaded, images, questions, mode.split("-")[1])
    base_s, base_rounds = runs["batched-recompute"]
    lines = [f"{batch} conversations x {rounds} rounds; ratios against batched-recompute (same run); "
             "round ms: one round step (batched: the whole group's; sessions: one ask, mean over conversations)",
             "", f"| mode | conversations/s | vs baseline | round 1 ms | round {rounds} ms | mean round ms | "
             "mean round vs baseline |", "|---|---|---|---|---|---|---|"]
    for mode, (seconds, per_round) in runs.items():
        mean = float(np.mean(per_round))
        lines.append(f"| {mode} | {batch / seconds:.2f} | {base_s / seconds:.2f}x | {per_round[0]:.1f} | "
                     f"{per_round[-1]:.1f} | {mean:.1f} | {float(np.mean(base_rounds)) / mean:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="also N conversations: batched-incremental / batched-recompute infer vs N sessions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _loaded(args.config, Path(tmp))
        image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
        questions = _questions(args.rounds)
        results = {}
        for mode in ("incremental", "recompute"):
            _run(loaded, image, mode, questions)  # warm-up: compiles every shape
            results[mode] = _run(loaded, image, mode, questions)
        batched = batched_table(loaded, Path(tmp), args.batch, args.rounds) if args.batch else []
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} config={args.config} "
          f"peak memory {_peak_memory_mb():.0f} MB")
    print("| round | incremental ms | recompute ms | recompute / incremental |")
    print("|---|---|---|---|")
    for r, (a, b) in enumerate(zip(results["incremental"], results["recompute"], strict=True), start=1):
        print(f"| {r} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    if batched:
        print("\n" + "\n".join(batched))


if __name__ == "__main__":
    main()
