"""Round latency of ``MultiRoundSession``: incremental (KV cache) vs recompute (the original's way).

    python benchmarks/multiround.py                    # tiny config, CPU-friendly
    python benchmarks/multiround.py --config 7b        # SegLLM-7B shapes, random bf16 weights (GPU)

Each mode first runs one untimed warm-up conversation with the same rounds (so every shape is
compiled), then a timed one; the table gives milliseconds per round, the speed-up of incremental
over recompute in the same run, and peak memory (device peak on accelerators, process RSS on CPU).
Every other round cites an earlier one with ``[REF:k]``.
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

from segllm_jax import checkpoint
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


def _questions(rounds: int) -> list[str]:
    out = []
    for r in range(rounds):
        q = QUESTIONS[r % len(QUESTIONS)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _loaded(args.config, Path(tmp))
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    questions = _questions(args.rounds)
    results = {}
    for mode in ("incremental", "recompute"):
        _run(loaded, image, mode, questions)  # warm-up: compiles every shape
        results[mode] = _run(loaded, image, mode, questions)
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} config={args.config} "
          f"peak memory {_peak_memory_mb():.0f} MB")
    print("| round | incremental ms | recompute ms | recompute / incremental |")
    print("|---|---|---|---|")
    for r, (a, b) in enumerate(zip(results["incremental"], results["recompute"], strict=True), start=1):
        print(f"| {r} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
