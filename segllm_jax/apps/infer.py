"""``segllm-jax infer``: many images x conversations, batched, for GPU inference jobs.

The manifest is JSON lines, one conversation per line: ``{"image": PATH, "queries": [q1, q2, ...]}``
(queries may carry ``[REF:k]``; an optional ``"id"`` names the output folder: a plain file name,
unique in the manifest). The whole manifest is checked before any work starts. Conversations are
processed in groups of ``--batch-size`` (:func:`infer_group`):

* per image, once: CLIP's patch features and HIPIE's backbone pass;
* the group shares one KV cache, a row per conversation, its capacity fixed from the encoded
  conversations (every round's tokens are known up front: answers are not part of the prompt) and
  bucketed, so a group compiles a few shapes, not one per round;
* rounds within a conversation stay sequential (a reference needs the earlier round's mask); round r
  of every conversation runs in ONE batch that holds only round r's new tokens, padded to a bucketed
  length, on top of the cache (:func:`segllm_jax.session.run_round`: the step a
  :class:`~segllm_jax.session.MultiRoundSession` runs with one row, so each answer equals its own
  session's, tested); a conversation that has no round r passes padding;
* HIPIE then decodes every row's new prompt together, each on its own image's features (the rows
  of finished conversations too: one compiled shape per group; their masks are dropped).

``mode="recompute"`` (:func:`run_infer`, :func:`infer_group`) instead rebuilds every conversation
from its first token each round, as the original does; ``benchmarks/multiround.py --batch N``
compares the two. A conversation with bad input (an unreadable image, a bad ``[REF:k]``, more
tokens than the model's context: the session's sentence) is recorded with its error in
``results.json``, after the rounds before it; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from segllm_jax.checkpoint import Loaded
from segllm_jax.errors import InputError, SegLLMError
from segllm_jax.manifest import RESULTS, read_manifest
from segllm_jax.models.hipie.model import image_features_jit, predict
from segllm_jax.outputs import atomic_write_text, make_output_folder
from segllm_jax.prompt import ConversationEncoder, EncodedConversation
from segllm_jax.session import (
    ImageContext,
    Mode,
    RoundResult,
    cache_for,
    cited,
    image_embeds_jit,
    next_round,
    round_result,
    run_round,
    save_round,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Conversation:
    """One manifest line and, once :func:`infer_group` ran, its answers (or its error)."""

    id: str
    image: str
    queries: list[str]
    ctx: ImageContext | None = None
    encoded: list[EncodedConversation] = dataclasses.field(default_factory=list)  # through round r, per r
    questions: list[str] = dataclasses.field(default_factory=list)
    refs: list[list[int]] = dataclasses.field(default_factory=list)
    results: list[RoundResult] = dataclasses.field(default_factory=list)
    error: str | None = None

    def encode(self, encoder: ConversationEncoder, context_length: int) -> None:
        """Encodes the rounds up to the first one that cannot be (its error is recorded): the answers
        are not part of a prompt, so every round's tokens are known before any runs."""
        conversation = EncodedConversation.empty()
        for r, query in enumerate(self.queries):
            try:
                conversation, question, refs = next_round(encoder, conversation, query, context_length)
            except SegLLMError as e:
                self.error = f"round {r + 1}: {e}"
                return
            self.encoded.append(conversation)
            self.questions.append(question)
            self.refs.append(refs)


def infer_group(loaded: Loaded, group: list[Conversation], *, mode: Mode = "incremental",
                on_round: Callable[[int], object] | None = None) -> None:
    """Runs ``group``'s conversations together, round by round, into their ``results`` (``on_round(n)``
    after each round, n = conversations that had one)."""
    if mode not in ("incremental", "recompute"):
        raise InputError(f"mode must be 'incremental' or 'recompute', not {mode!r}.")
    cfg, model = loaded.config, loaded.model
    encoder = ConversationEncoder(loaded.tokenizer, cfg.num_image_tokens)
    for conv in group:
        try:
            conv.ctx = ImageContext.prepare(conv.image, cfg)
        except SegLLMError as e:
            conv.error = str(e)
        except Exception as e:  # one odd file must not end a long batch job
            log.warning("infer: %s: unexpected error preparing %s", conv.id, conv.image, exc_info=True)
            conv.error = f"{conv.image} could not be prepared (unexpected {type(e).__name__}: {str(e)[:160]})."
        else:
            conv.encode(encoder, cfg.context_length)
    in_group = [i for i, c in enumerate(group) if c.encoded]  # the batch's rows (row b shows image b)
    if not in_group:
        return
    rows = [group[i] for i in in_group]
    blank = np.zeros_like(rows[0].ctx.frame_u8)  # keeps HIPIE's image index = position in the group
    frames = np.stack([c.ctx.frame_u8 if c.ctx else blank for c in group])
    levels = image_features_jit(model.segmentator, jnp.asarray(frames))  # once per image
    clip = jnp.asarray(np.stack([c.ctx.clip_pixels for c in rows]))
    image_embeds = image_embeds_jit(model, clip)  # once per image
    # round r's conversations, one per row: through round r, or empty once a conversation is done
    per_round = [[c.encoded[r] if r < len(c.encoded) else EncodedConversation.empty() for c in rows]
                 for r in range(max(len(c.encoded) for c in rows))]
    cache = cache_for(model, per_round) if mode == "incremental" else None
    for r, now in enumerate(per_round):
        active = [b for b, c in enumerate(rows) if r < len(c.encoded)]
        references = [cited(c.results, c.refs[:r + 1]) if r < len(c.encoded) else [] for c in rows]
        hidden, prompts, cache = run_round(model, now, references, clip, image_embeds, cache)
        # every row's prompt, done or not: one HIPIE shape per group, not one per number of active rows
        pred = predict(model.segmentator, None, prompts, in_group, levels=levels)
        for b in active:
            conv = rows[b]
            conv.results.append(round_result(conv.ctx, cfg, r + 1, conv.questions[r], conv.refs[r], pred.masks[b],
                                             pred.boxes_xyxy[b], pred.scores[b], hidden[b], prompts[b]))
        if on_round:
            on_round(len(active))


def _write(conv: Conversation, out: Path) -> dict:
    entry = {"id": conv.id, "image": conv.image, "rounds": [], "error": conv.error}
    folder = out / conv.id  # a checked file name (read_manifest): never outside ``out``
    if conv.results:
        folder.mkdir(parents=True, exist_ok=True)
    for res in conv.results:
        entry["rounds"].append(save_round(res, conv.ctx.image, folder, prefix=f"{conv.id}/"))
    return entry


def run_infer(loaded: Loaded, manifest: str | Path, out: str | Path, batch_size: int = 8,
              progress: bool = True, mode: Mode = "incremental") -> list[dict]:
    """Runs every conversation of ``manifest`` (groups of ``batch_size``) and writes ``out``; ``mode``:
    ``"incremental"`` (KV cache, new tokens only) or ``"recompute"`` (every round from the first token)."""
    items = [Conversation(e.id, e.image, e.queries) for e in read_manifest(manifest)]
    out = make_output_folder(out)
    results = []
    bar = tqdm(total=sum(len(c.queries) for c in items), unit="round", desc="infer", disable=not progress)
    for start in range(0, len(items), batch_size):
        group = items[start:start + batch_size]
        infer_group(loaded, group, mode=mode, on_round=bar.update)
        bar.update(sum(len(c.queries) - len(c.results) for c in group))  # the rounds a failure skipped
        for conv in group:
            results.append(_write(conv, out))
    bar.close()
    atomic_write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    return results
