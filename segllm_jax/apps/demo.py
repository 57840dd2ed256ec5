"""``make demo`` / ``segllm-jax demo``: a scripted 4-round conversation on a generated MR-Shapes scene.

It runs the real path end to end with the trained tiny checkpoint that ships with the repository
(``checkpoints/tiny_mrshapes``, trained from scratch on MR-Shapes on a 2-core CPU by the five-stage
recipe ``configs/tiny_mrshapes_recipe.sh``): the folder is loaded with ``segllm_jax.load``, a test
scene the model never saw goes through both image pipelines, each round's question (later rounds name an earlier answer
with ``[REF:k]``) through the tokenizer and ``MultiRoundSession`` (incremental KV cache, reference
re-encoding, HIPIE), and the overlays are written as PNGs with per-round IoU against the scene's exact
ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segllm_jax import checkpoint
from segllm_jax.data import mrshapes
from segllm_jax.errors import InputError
from segllm_jax.session import MultiRoundSession

SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny_mrshapes"
DEMO_ROUNDS = 4
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 0.0


def demo_scene(seed: int, rounds: int = DEMO_ROUNDS) -> tuple[int, mrshapes.Scene, mrshapes.Conversation]:
    """The first test-split scene of ``seed`` whose conversation has ``rounds`` rounds (deterministic)."""
    for index in range(1000):
        scene, conversation = mrshapes.scene_and_conversation(seed, "test", index, max_rounds=rounds)
        if len(conversation.rounds) == rounds:
            return index, scene, conversation
    raise InputError(f"no MR-Shapes test scene of seed {seed} supports {rounds} rounds in 1000 draws.")


def contact_sheet(scene_image: np.ndarray, overlays: list[Image.Image], captions: list[str]) -> Image.Image:
    """The scene and every round's overlay side by side, each captioned (the README's picture)."""
    tiles = [Image.fromarray(scene_image)] + overlays
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * len(tiles), h + 28), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, caption) in enumerate(zip(tiles, ["scene"] + captions, strict=True)):
        sheet.paste(tile, (i * w, 28))
        draw.text((i * w + 4, 8), caption, fill="black")
    return sheet


def run_demo(out: str | Path, seed: int = 7, checkpoint_dir: str | Path | None = None) -> list[float]:
    """Runs the conversation, writes ``scene.png``, ``round_<r>.png`` and ``rounds.png``; per-round IoUs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else SHIPPED_CHECKPOINT
    if not (ckpt / "config.json").is_file():
        raise InputError(f"no checkpoint at {ckpt}: the demo uses the tiny checkpoint shipped in the repository's "
                         "checkpoints/ folder (run from a clone) or one given with --checkpoint.")
    loaded = checkpoint.load(ckpt)

    index, scene, conversation = demo_scene(seed)
    Image.fromarray(scene.image).save(out / "scene.png")
    session = MultiRoundSession(loaded, out / "scene.png")
    print(f"scene: {out / 'scene.png'} (MR-Shapes test scene {index} of seed {seed}, {scene.image.shape[1]}x"
          f"{scene.image.shape[0]}, {len(scene.shapes)} shapes, never seen in training); checkpoint: {ckpt}")
    ious, overlays = [], []
    for r, round_ in enumerate(conversation.rounds, start=1):
        t0 = time.perf_counter()
        result = session.ask(round_.tagged_question)
        ms = (time.perf_counter() - t0) * 1e3
        iou = _iou(result.mask, scene.mask(round_.target))
        ious.append(iou)
        overlays.append(session.overlay(result, PALETTE[(r - 1) % len(PALETTE)]))
        overlays[-1].save(out / f"round_{r}.png")
        print(f"round {r}: {round_.tagged_question!r:70} IoU vs ground truth {iou:.3f}  ({ms:.0f} ms)  "
              f"-> {out / f'round_{r}.png'}")
    contact_sheet(scene.image, overlays, [f"round {r}: IoU {iou:.2f}" for r, iou in enumerate(ious, 1)]).save(
        out / "rounds.png")
    print(f"mean IoU {np.mean(ious):.3f} over {len(ious)} rounds; all rounds: {out / 'rounds.png'}; "
          f"total {time.perf_counter() - start:.1f} s")
    return ious
