"""Grounding conversations on MR-Shapes scenes: the data of the learning recipe's first stage.

Why: the released SegLLM starts from a HIPIE that was already grounded on referring expressions and an
LLM that already reads. A tiny model trained from scratch has neither, and on the benchmark's own
conversations (mostly superlatives and relations, two HIPIE prompts per conversation, each answer
depending on the previous ones) it learns to segment *a* shape long before it learns *which* one.
This module writes the analogue of HIPIE's referring-expression pretraining on the same training
scenes: every round is an independent referring question about the scene,

* direct questions, with a share of plain attribute questions ("the red circle") that are easy to
  ground, next to superlatives ("the topmost triangle");
* referring questions whose reference is a ground-truth instance handed over as mask-encode and
  box-encode inputs, exactly as a later round sees an earlier answer, so the [REF] path is trained
  from the start,

several rounds per scene, so different targets in one image are the contrastive signal. The JSON is
the released conversation format and points at the ``train`` split's images and register (same mask
ids), so it trains through the ordinary pipeline, with nothing special in the model or the step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from segllm_jax.data import mrshapes, referring
from segllm_jax.data.conversations import DecodeTarget, conversation_entry, format_round
from segllm_jax.data.mrshapes import DATASET_NAME, Query, Scene
from segllm_jax.errors import InputError

GROUNDING_FILE = f"{DATASET_NAME}_grounding.json"
# the reading stage's curriculum start: the same scenes, attribute questions only ("the red circle"), whose answer
# is one lookup in the image (a colour and a kind), before superlatives and relations
ATTRIBUTE_FILE = f"{DATASET_NAME}_attribute.json"


def grounding_rounds(scene: Scene, rng: np.random.Generator, n_rounds: int = 6, attribute_share: float = 0.5,
                     referring_share: float = 0.5) -> list[tuple[Query, int, int | None]]:
    """``n_rounds`` independent ``(query, target, reference instance or None)`` about ``scene``.

    Round 1 is direct (it carries the image); each later round is referring with probability
    ``referring_share`` (when the scene has a valid one), else direct. A direct round is an attribute
    question with probability ``attribute_share`` (when the scene has one), else a superlative.
    Targets may repeat across rounds: the rounds do not depend on each other.
    """
    direct = referring.direct_options(scene)
    if not direct:
        return []
    attributes = [o for o in direct if o[0].extreme is None]
    superlatives = [o for o in direct if o[0].extreme is not None]
    relational = [(ref, q, t) for options in referring.referring_options(scene, range(len(scene.shapes))).values()
                  for ref, q, t in options]
    rounds: list[tuple[Query, int, int | None]] = []
    for k in range(n_rounds):
        if k > 0 and relational and rng.random() < referring_share:
            ref, query, target = relational[int(rng.integers(len(relational)))]
            rounds.append((query, target, ref))
            continue
        pool = attributes if attributes and (not superlatives or rng.random() < attribute_share) else superlatives
        query, target = pool[int(rng.integers(len(pool)))]
        rounds.append((query, target, None))
    return rounds


def grounding_entry(seed: int, index: int, n_rounds: int = 6, attribute_only: bool = False) -> dict:
    """The grounding conversation of training scene ``index`` (JSON entry, released format); with
    ``attribute_only`` every round is an attribute question (a scene without one gets superlatives)."""
    scene, _ = mrshapes.scene_and_conversation(seed, "train", index)
    rng = np.random.default_rng([seed, 101, index])  # its own stream: the train split is unchanged
    image = f"{DATASET_NAME}/train/{index:06d}.png"
    mask_id = [f"train_{index:06d}_{i}" for i in range(len(scene.shapes))].__getitem__
    turns = []
    shares = dict(attribute_share=1.0, referring_share=0.0) if attribute_only else {}
    for k, (query, target, ref) in enumerate(grounding_rounds(scene, rng, n_rounds, **shares)):
        if ref is None:
            question = referring.question(rng, referring.describe(query))
            decode = DecodeTarget(image, DATASET_NAME, mask_id(target))
        else:
            # "instance k" names an earlier round in a real conversation; here any earlier number
            question = referring.question(rng, referring.describe(query, int(rng.integers(max(k, 1)))))
            decode = DecodeTarget(image, DATASET_NAME, mask_id(target), (mask_id(ref),), query.relation)
        turns += format_round(question, decode, opens_image=k == 0)
    return conversation_entry(f"{DATASET_NAME}_grounding_{index:06d}", turns)


def write_grounding(out_dir: str | Path, n: int, seed: int, n_rounds: int = 6, attribute_only: bool = False) -> Path:
    """``<out>/conversations/mrshapes_grounding.json`` (``mrshapes_attribute.json`` with ``attribute_only``) for
    the first ``n`` scenes of the ``train`` split that ``mrshapes.write_split(out, "train", >= n, seed)`` wrote
    (its images and register are reused)."""
    if n < 0 or seed < 0 or n_rounds < 1:
        raise InputError(f"need n >= 0, seed >= 0 and n_rounds >= 1 (got {n}, {seed}, {n_rounds}).")
    path = Path(out_dir) / "conversations" / (ATTRIBUTE_FILE if attribute_only else GROUNDING_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [grounding_entry(seed, i, n_rounds, attribute_only) for i in range(n)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([e for e in entries if e["conversations"]], indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
