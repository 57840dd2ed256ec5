"""The batch boundary of the data side: the typed :class:`Example` the pipeline builds from one conversation,
and :func:`collate_inputs`, which turns examples into the arguments of ``segllm_jax.batch.collate``.

Training (``train/batching.py``) and evaluation (``eval/evaluate.py``) both read examples through this module;
it sits in the data layer because evaluation, below training, needs it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from segllm_jax.prompt import EncodedConversation, RoundLayout


# A JAX pytree so that grain's worker processes (``Pipeline(worker_count > 0)``) hand its arrays over in
# shared memory, as they do for the leaves of any nested dict/list; it never enters a jitted function.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation, model-ready, as NumPy arrays (built by ``ExampleBuilder``).

    T tokens, N rounds (one ``<seg>`` each), R references, P image tokens, C = CLIP size, S = HIPIE frame.
    The token layout is stored flat (``round_ends`` and the position arrays); :func:`encoded_conversation`
    rebuilds the tokenizer's per-round layout from it.
    """

    input_ids: np.ndarray  # [T] int32
    labels: np.ndarray  # [T] int32, IGNORE_INDEX except assistant-emitted tokens
    round_ends: np.ndarray  # [N] int32, one past each round's last token
    image_positions: np.ndarray  # [P] int32, the image's <video> slots
    seg_positions: np.ndarray  # [N] int32, each round's <seg>
    ref_mask_positions: np.ndarray  # [R] int32, each reference's mask-encode slot
    ref_box_positions: np.ndarray  # [R] int32, each reference's box-encode slot
    ref_rounds: np.ndarray  # [R] int32, the round each reference is in
    clip_image: np.ndarray  # [C, C, 3] float32, CLIP-preprocessed
    hipie_image: np.ndarray  # [S, S, 3] uint8, resized and padded
    hipie_size: np.ndarray  # [2] int32, (h, w) after resizing, before padding
    ref_crops: np.ndarray  # [R, C, C, 3] float32, CLIP-preprocessed masked crops (architecture.md §D6)
    ref_boxes: np.ndarray  # [R, 4] float32, [r0, c0, r1, c1] / S
    target_masks: np.ndarray  # [N, S, S] bool, each round's target in the HIPIE frame
    aux_masks: np.ndarray  # [N, S, S] bool, each round's supervised reference (zeros if none)
    has_aux: np.ndarray  # [N] bool
    conv_id: str
    file_index: int | None = None  # which conversation file of the mixture (set by the pipeline's BatchLoader)
    record_index: int | None = None  # which entry of that file (set by the BatchLoader)


def encoded_conversation(example: Example) -> EncodedConversation:
    """Rebuild the tokenizer's per-round layout from an example's flat position arrays."""
    ends = [int(e) for e in example.round_ends]
    image = example.image_positions
    layouts = []
    for k, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        in_round = example.ref_rounds == k
        layouts.append(RoundLayout(
            start=start, end=end,
            image_positions=image[(image >= start) & (image < end)],
            mask_encode_positions=example.ref_mask_positions[in_round],
            box_encode_positions=example.ref_box_positions[in_round],
            seg_position=int(example.seg_positions[k])))
    return EncodedConversation(example.input_ids, example.labels, tuple(layouts))


def collate_inputs(examples: Sequence[Example]) -> tuple[list[EncodedConversation], np.ndarray,
                                                         list[int], list[list[list[Any]]]]:
    """Arguments ``(conversations, clip_images, image_of_row, references)`` of ``segllm_jax.batch.collate``.

    The masks and HIPIE images are not part of ``ConversationBatch``; training stacks them from the examples.
    """
    # segllm_jax.batch loads the models (Flax); grain's workers import this module for Example only
    from segllm_jax.batch import Reference

    references = []
    for example in examples:
        per_round: list[list[Any]] = [[] for _ in example.round_ends]
        for k, crop, box in zip(example.ref_rounds, example.ref_crops, example.ref_boxes, strict=True):
            per_round[int(k)].append(Reference(crop=crop, box=box))
        references.append(per_round)
    clip_images = np.stack([example.clip_image for example in examples])
    return [encoded_conversation(e) for e in examples], clip_images, list(range(len(examples))), references
