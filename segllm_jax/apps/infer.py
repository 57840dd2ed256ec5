"""``segllm-jax infer``: many images x conversations, batched, for GPU inference jobs.

The manifest is JSON lines, one conversation per line: ``{"image": PATH, "queries": [q1, q2, ...]}``
(queries may carry ``[REF:k]``; an optional ``"id"`` names the output folder: a plain file name,
unique in the manifest). The whole manifest is checked before any work starts. Conversations are
processed in groups of ``--batch-size``: per round, every conversation of the group that still has
a query is rebuilt and run in ONE teacher-forced batch (:mod:`segllm_jax.batch`), then HIPIE
decodes all of the group's new ``<seg>`` prompts together, each on its own image's backbone
features (computed once per image). Rounds within a conversation stay sequential, because a
reference needs the earlier round's mask. A conversation with bad input is recorded with its
error in ``results.json`` and skipped; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from segllm_jax import batch as batching
from segllm_jax.checkpoint import Loaded
from segllm_jax.errors import SegLLMError
from segllm_jax.manifest import RESULTS, read_manifest
from segllm_jax.models.hipie.model import image_features_jit, predict
from segllm_jax.outputs import atomic_write_text, make_output_folder
from segllm_jax.prompt import ConversationEncoder, EncodedConversation
from segllm_jax.session import ImageContext, RoundResult, next_round, round_result, save_round

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Conversation:
    id: str
    image: str
    queries: list[str]
    ctx: ImageContext | None = None
    encoded: EncodedConversation | None = None
    refs: list[list[int]] = dataclasses.field(default_factory=list)
    results: list[RoundResult] = dataclasses.field(default_factory=list)
    error: str | None = None


@nnx.jit
def _forward_prompts(model, batch: batching.ConversationBatch) -> tuple[jax.Array, jax.Array]:
    out, prompts = batching.forward(model, batch)
    return out.hidden[batch.seg_rows, batch.seg_cols - 1], prompts  # [N, D], [N, 8, 768]


def _step_round(loaded: Loaded, encoder: ConversationEncoder, group: list[_Conversation], r: int, levels) -> None:
    cfg = loaded.config
    active = []
    for conv in group:
        if conv.error or r >= len(conv.queries):
            continue
        try:
            encoded, question, refs = next_round(encoder, conv.encoded or EncodedConversation.empty(), conv.queries[r],
                                                 cfg.context_length)
        except SegLLMError as e:
            conv.error = f"round {r + 1}: {e}"
            continue
        conv.encoded = encoded
        conv.refs.append(refs)
        active.append((conv, question, refs))
    if not active:
        return
    convs = [c for c, _, _ in active]
    references = [[[batching.Reference(c.results[k - 1].ref_crop, c.results[k - 1].ref_box) for k in refs]
                   for refs in c.refs] for c in convs]
    longest = max(c.encoded.num_tokens for c in convs)
    batch = batching.collate([c.encoded for c in convs], np.stack([c.ctx.clip_pixels for c in convs]),
                             list(range(len(convs))), references, gate=cfg.eval_reference_gate,
                             pad_to=batching.bucketed(longest))
    hidden, prompts = _forward_prompts(loaded.model, batch)  # one per <seg>, row-major over conversations
    last = np.cumsum([len(c.encoded.rounds) for c in convs]) - 1  # each conversation's newest <seg>
    image_index = [group.index(c) for c in convs]
    pred = predict(loaded.model.segmentator, None, prompts[last], image_index, levels=levels)
    for i, (conv, question, refs) in enumerate(active):
        conv.results.append(round_result(conv.ctx, cfg, r + 1, question, refs, pred.masks[i], pred.boxes_xyxy[i],
                                         pred.scores[i], hidden[last[i]], prompts[last[i]]))


def _write(conv: _Conversation, out: Path) -> dict:
    entry = {"id": conv.id, "image": conv.image, "rounds": [], "error": conv.error}
    folder = out / conv.id  # a checked file name (read_manifest): never outside ``out``
    if conv.results:
        folder.mkdir(parents=True, exist_ok=True)
    for res in conv.results:
        entry["rounds"].append(save_round(res, conv.ctx.image, folder, prefix=f"{conv.id}/"))
    return entry


def run_infer(loaded: Loaded, manifest: str | Path, out: str | Path, batch_size: int = 8,
              progress: bool = True) -> list[dict]:
    items = [_Conversation(e.id, e.image, e.queries) for e in read_manifest(manifest)]
    out = make_output_folder(out)
    encoder = ConversationEncoder(loaded.tokenizer, loaded.config.num_image_tokens)
    results = []
    bar = tqdm(total=sum(len(c.queries) for c in items), unit="round", desc="infer", disable=not progress)
    for start in range(0, len(items), batch_size):
        group = items[start:start + batch_size]
        for conv in group:
            try:
                conv.ctx = ImageContext.prepare(conv.image, loaded.config)
            except SegLLMError as e:
                conv.error = str(e)
            except Exception as e:  # one odd file must not end a long batch job
                log.warning("infer: %s: unexpected error preparing %s", conv.id, conv.image, exc_info=True)
                conv.error = f"{conv.image} could not be prepared (unexpected {type(e).__name__}: {str(e)[:160]})."
        usable = [c for c in group if c.ctx]
        if usable:
            blank = np.zeros_like(usable[0].ctx.frame_u8)  # keeps image_index = position in the group
            frames = np.stack([c.ctx.frame_u8 if c.ctx else blank for c in group])
            levels = image_features_jit(loaded.model.segmentator, jnp.asarray(frames))  # once per image
            for r in range(max(len(c.queries) for c in group)):
                _step_round(loaded, encoder, group, r, levels)
                bar.update(sum(1 for c in group if r < len(c.queries)))
        for conv in group:
            results.append(_write(conv, out))
    bar.close()
    atomic_write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    return results
