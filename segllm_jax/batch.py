"""Teacher-forced batches of conversations: the path evaluation, training and inference use.

The original runs one forward per conversation over all its rounds (teacher forcing, architecture.md §D10).
:func:`collate` packs many conversations into one right-padded batch with flat, per-slot
bookkeeping (row, column, what to add), and :func:`forward` runs it: every ``<video>`` slot gets
its image patch feature or gated reference encoding added, the LLM runs once, and one HIPIE
prompt is read before every ``<seg>``. Host-side packing is NumPy; :func:`forward` is jit-able.

A row may also start at a later round (``collate(..., starts=...)``) and run on top of a KV cache
holding the rounds before it (``forward(..., cache=...)``): the incremental form inference uses
(:func:`segllm_jax.session.run_round`), exactly the same computation because attention is causal.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segllm_jax import preprocess
from segllm_jax.errors import InputError
from segllm_jax.models.llama import KVCache, LlamaOutput
from segllm_jax.models.segllm import SegLLM
from segllm_jax.prompt import IGNORE_INDEX, EncodedConversation

LENGTH_BUCKET = 64  # sequences are padded to a multiple of this: few shapes, few compilations


def bucketed(length: int, bucket: int = LENGTH_BUCKET) -> int:
    """``length`` rounded up to a multiple of ``bucket`` (jit compiles once per distinct shape)."""
    return -(-length // bucket) * bucket


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reference's inputs: the CLIP-preprocessed masked crop and the ``[r0, c0, r1, c1]/1024`` box."""

    crop: np.ndarray  # [224, 224, 3] float32
    box: np.ndarray  # [4] float32

    @classmethod
    def of_prediction(cls, frame_u8: np.ndarray, mask: np.ndarray, box_xyxy: np.ndarray, frame: int,
                      clip_size: int) -> "Reference":
        """A predicted round as a later round's reference, as the original CLI re-encodes it (§D6): the
        mask's crop of the HIPIE frame (box truncated to integers) and the box ``[y0, x0, y1, x1] / frame``."""
        x0, y0, x1, y1 = preprocess.reference_box(box_xyxy, frame)
        crop = preprocess.clip_image(preprocess.masked_crop(frame_u8, mask, (x0, y0, x1, y1)), clip_size)
        return cls(crop, np.asarray([y0, x0, y1, x1], np.float32) / frame)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConversationBatch:
    input_ids: jax.Array  # [B, T] int32, right-padded
    token_mask: jax.Array  # [B, T] bool
    labels: jax.Array  # [B, T] int32, IGNORE_INDEX = ignored (padding too)
    clip_images: jax.Array  # [I, H, W, 3] CLIP-preprocessed images
    image_slot_rows: jax.Array  # [B * P] row of each image <video> slot
    image_slot_cols: jax.Array  # [B * P] its column
    image_slot_image: jax.Array  # [B * P] which image
    image_slot_patch: jax.Array  # [B * P] which patch
    ref_rows: jax.Array  # [R]
    ref_mask_cols: jax.Array  # [R] column of the mask-encode slot
    ref_box_cols: jax.Array  # [R] column of the box-encode slot
    ref_crops: jax.Array  # [R, H, W, 3]
    ref_boxes: jax.Array  # [R, 4]
    ref_gates: jax.Array  # [R, 2] multipliers of (mask, box) encodings: 0.5 at eval, Bernoulli in training
    seg_rows: jax.Array  # [N] one per <seg>, row-major over (batch, position) like the original
    seg_cols: jax.Array  # [N] column of the <seg> (the prompt is read at column - 1)

    def pad(self, *, tokens: int | None = None, references: int | None = None,
            prompts: int | None = None) -> ConversationBatch:
        """This batch with ``tokens`` columns, ``references`` reference slots and ``prompts`` ``<seg>`` slots
        (None: as they are), so training batches reuse few compiled shapes and hosts can stack theirs.

        The padding changes nothing: padding tokens are masked and ignored by the loss; a padding reference
        adds ``0 x`` its encoding at (row 0, col 0) (gate 0); a padding prompt reads (row 0, col 0) and its
        owner gives it weight 0. NumPy fields stay NumPy, JAX fields JAX.
        """
        t = self.input_ids.shape[1] if tokens is None else tokens
        r = self.ref_rows.shape[0] if references is None else references
        n = self.seg_rows.shape[0] if prompts is None else prompts
        return dataclasses.replace(
            self, input_ids=pad_axis(self.input_ids, t, 0, axis=1),
            token_mask=pad_axis(self.token_mask, t, False, axis=1),
            labels=pad_axis(self.labels, t, IGNORE_INDEX, axis=1),
            ref_rows=pad_axis(self.ref_rows, r), ref_mask_cols=pad_axis(self.ref_mask_cols, r),
            ref_box_cols=pad_axis(self.ref_box_cols, r), ref_crops=pad_axis(self.ref_crops, r),
            ref_boxes=pad_axis(self.ref_boxes, r), ref_gates=pad_axis(self.ref_gates, r),
            seg_rows=pad_axis(self.seg_rows, n), seg_cols=pad_axis(self.seg_cols, n, 1))


def pad_axis(x: np.ndarray | jax.Array, size: int, value: int | float | bool = 0, axis: int = 0):
    """``x`` padded with ``value`` to ``size`` along ``axis``, on the host; a JAX array comes back as one."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    out = np.pad(np.asarray(x), widths, constant_values=value)
    return jnp.asarray(out) if isinstance(x, jax.Array) else out


def collate(conversations: Sequence[EncodedConversation], clip_images: np.ndarray | jax.Array,
            image_of_row: Sequence[int], references: Sequence[Sequence[Sequence[Reference]]], *, gate: float = 0.5,
            pad_to: int | None = None, starts: Sequence[int] | None = None) -> ConversationBatch:
    """Packs conversations; ``references[b][r]`` lists round r's references of conversation b, in order.

    ``starts[b]`` (default 0, else a round's first token or the conversation's end) leaves out conversation
    b's tokens before it, which a KV cache holds already: row b holds the rounds from there on, at columns
    counted from ``starts[b]``, and its ``<seg>`` slots are those rounds' only.
    """
    starts = [0] * len(conversations) if starts is None else list(starts)
    lengths = [c.num_tokens - s for c, s in zip(conversations, starts, strict=True)]
    t = max(lengths) if pad_to is None else pad_to
    if max(lengths) > t:
        raise InputError(f"a conversation has {max(lengths)} tokens, more than the batch length {t}.")
    b = len(conversations)
    ids = np.zeros((b, t), np.int32)
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, t), bool)
    img_rows, img_cols, img_image, img_patch = [], [], [], []
    ref_rows, ref_mcols, ref_bcols, crops, boxes = [], [], [], [], []
    seg_rows, seg_cols = [], []
    rows = zip(conversations, starts, image_of_row, references, strict=True)
    for row, (conv, start, image, refs) in enumerate(rows):
        if start not in {0, conv.num_tokens, *(layout.start for layout in conv.rounds)}:
            raise InputError(f"conversation {row}: start {start} is not where a round starts.")
        n = conv.num_tokens - start
        ids[row, :n], labels[row, :n], mask[row, :n] = conv.input_ids[start:], conv.labels[start:], True
        if len(refs) != len(conv.rounds):
            raise InputError(f"conversation {row} has {len(conv.rounds)} rounds but references for {len(refs)}.")
        for layout, round_refs in zip(conv.rounds, refs, strict=True):
            if layout.start < start:  # in the cache already
                continue
            p = layout.image_positions - start
            img_rows.append(np.full(p.size, row))
            img_cols.append(p)
            img_image.append(np.full(p.size, image))
            img_patch.append(np.arange(p.size))
            if len(round_refs) != layout.mask_encode_positions.size:
                raise InputError(f"conversation {row}: a round has {layout.mask_encode_positions.size} reference "
                                 f"slots but {len(round_refs)} references were given.")
            slots = zip(round_refs, layout.mask_encode_positions, layout.box_encode_positions, strict=True)
            for ref, mcol, bcol in slots:
                ref_rows.append(row)
                ref_mcols.append(mcol - start)
                ref_bcols.append(bcol - start)
                crops.append(ref.crop)
                boxes.append(ref.box)
            seg_rows.append(row)
            seg_cols.append(layout.seg_position - start)
    crop_shape = clip_images.shape[1:]
    i32 = lambda xs: jnp.asarray(np.concatenate(xs) if xs and np.ndim(xs[0]) else np.asarray(xs), jnp.int32)  # noqa: E731
    return ConversationBatch(
        input_ids=jnp.asarray(ids), token_mask=jnp.asarray(mask), labels=jnp.asarray(labels),
        clip_images=jnp.asarray(clip_images),
        image_slot_rows=i32(img_rows), image_slot_cols=i32(img_cols), image_slot_image=i32(img_image),
        image_slot_patch=i32(img_patch),
        ref_rows=i32(ref_rows), ref_mask_cols=i32(ref_mcols), ref_box_cols=i32(ref_bcols),
        ref_crops=jnp.asarray(np.stack(crops) if crops else np.zeros((0, *crop_shape), np.float32)),
        ref_boxes=jnp.asarray(np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)),
        ref_gates=jnp.full((len(crops), 2), gate, jnp.float32),
        seg_rows=i32(seg_rows), seg_cols=i32(seg_cols))


def forward(model: SegLLM, batch: ConversationBatch, cache: KVCache | None = None,
            image_embeds: jax.Array | None = None, *,
            return_layer_outputs: bool = False) -> tuple[LlamaOutput, jax.Array]:
    """One teacher-forced pass: LLM outputs and the HIPIE prompts ``[N, 8, 768]`` of every ``<seg>``.

    ``cache``: keys/values of the tokens before each row (rows collated with ``starts``); None: a fresh one.
    ``image_embeds [I, P, D]``: the images' projected patch features, if computed already (else from
    ``batch.clip_images``, and only when the batch has image slots). ``return_layer_outputs``: the LLM
    output keeps every layer's output (the training step's attention aid reads them).
    """
    slots = []  # (rows, cols, values) to add to the token embeddings
    if batch.image_slot_rows.shape[0]:  # static; a later round on top of a cache has no image slots
        if image_embeds is None:
            image_embeds = model.image_embeds(batch.clip_images)  # [I, P, D]
        slots.append((batch.image_slot_rows, batch.image_slot_cols,
                      image_embeds[batch.image_slot_image, batch.image_slot_patch]))
    if batch.ref_rows.shape[0]:
        slots += [(batch.ref_rows, batch.ref_mask_cols, batch.ref_gates[:, :1] * model.mask_encode(batch.ref_crops)),
                  (batch.ref_rows, batch.ref_box_cols, batch.ref_gates[:, 1:] * model.box_encode(batch.ref_boxes))]
    if slots:
        rows, cols, values = (jnp.concatenate(parts) for parts in zip(*slots, strict=True))
        embeds = model.inputs_embeds(batch.input_ids, rows, cols, values)
    else:  # nothing to add
        embeds = model.llm.embed(batch.input_ids)
    out = model.run_llm(embeds, batch.token_mask, cache, return_layer_outputs)
    return out, model.seg_prompts(out.hidden, batch.seg_rows, batch.seg_cols - 1)
