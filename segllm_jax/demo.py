"""``make demo`` / ``segllm-jax demo``: a scripted multi-round conversation on a generated MR-Shapes scene.

It runs the real path end to end: a checkpoint folder is loaded with ``segllm_jax.load``, the
scene goes through both image pipelines, each round's question (with ``[REF:k]`` tags) through the
tokenizer and ``MultiRoundSession`` (incremental KV cache, reference re-encoding, HIPIE), and the
overlays are written as PNGs with per-round IoU against the scene's exact ground truth.

Until a trained tiny checkpoint ships with the repository (the learning-proof issue), the model is
the ``tiny`` SegLLM with RANDOM weights and a tokenizer trained on MR-Shapes questions; the demo
says so, and its IoUs are those of an untrained model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from segllm_jax import checkpoint
from segllm_jax.config import SegLLMConfig
from segllm_jax.data import mrshapes
from segllm_jax.data.tiny_tokenizer import train_tokenizer
from segllm_jax.session import MultiRoundSession
from segllm_jax.tokenizer import SYSTEM_PROMPT

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def _random_tiny_checkpoint(directory: Path, seed: int) -> Path:
    """A tiny SegLLM with random weights + a tokenizer trained on MR-Shapes questions."""
    texts = [SYSTEM_PROMPT + " USER: ASSISTANT:"]
    for i in range(200):
        _, conversation = mrshapes.scene_and_conversation(seed, "train", i)
        texts += [r.question for r in conversation.rounds]
    train_tokenizer(texts, directory, vocab_size=400)
    from segllm_jax.tokenizer import SegTokenizer

    tokenizer = SegTokenizer.from_pretrained(directory)
    cfg = SegLLMConfig.tiny(vocab_size=tokenizer.vocab_size)
    model = checkpoint.build_model("segllm", cfg, seed=seed)
    checkpoint.save(directory, "segllm", cfg, checkpoint.flat_arrays(model))
    tokenizer.save(directory)
    return directory


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 0.0


def run_demo(out: str | Path, seed: int = 7, checkpoint_dir: str | Path | None = None) -> list[float]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if checkpoint_dir is None:
        print("NOTE: no trained tiny checkpoint ships yet: this demo runs the tiny SegLLM with RANDOM weights.\n"
              "      Every stage is real (tokenizer, CLIP + HIPIE pipelines, KV-cached rounds, [REF:k] memory),\n"
              "      but the masks are those of an untrained model.")
        ckpt = out / "checkpoint"
        if not (ckpt / "params").exists():
            _random_tiny_checkpoint(ckpt, seed)
    else:
        ckpt = Path(checkpoint_dir)
    loaded = checkpoint.load(ckpt)

    scene, conversation = mrshapes.scene_and_conversation(seed, "test", 0, max_rounds=4)
    Image.fromarray(scene.image).save(out / "scene.png")
    session = MultiRoundSession(loaded, out / "scene.png")
    print(f"scene: {out / 'scene.png'} ({scene.image.shape[1]}x{scene.image.shape[0]}, "
          f"{len(scene.shapes)} shapes); checkpoint: {ckpt}")
    ious = []
    for r, round_ in enumerate(conversation.rounds, start=1):
        t0 = time.perf_counter()
        result = session.ask(round_.tagged_question)
        ms = (time.perf_counter() - t0) * 1e3
        iou = _iou(result.mask, scene.mask(round_.target))
        ious.append(iou)
        session.overlay(result, PALETTE[(r - 1) % len(PALETTE)]).save(out / f"round_{r}.png")
        print(f"round {r}: {round_.tagged_question!r:70} IoU vs ground truth {iou:.3f}  ({ms:.0f} ms)  "
              f"-> {out / f'round_{r}.png'}")
    print(f"mean IoU {np.mean(ious):.3f} over {len(ious)} rounds; total {time.perf_counter() - start:.1f} s")
    return ious
