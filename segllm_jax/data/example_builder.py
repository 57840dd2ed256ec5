"""One conversation entry -> one :class:`~segllm_jax.data.example.Example` (:class:`ExampleBuilder`).

The builder tokenizes the conversation (cut after the last round that fits ``max_length``), reads the image and
the masks it names (from the registers, or from the record itself for a TFDS split), and makes the CLIP image, the
HIPIE frame, the reference crops and boxes of architecture.md §D6 and the GT masks per ``<seg>`` (§D5, §T1).
Host-side NumPy; the data pipeline (``segllm_jax.data.pipeline``) and evaluation both use it.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from segllm_jax.data.conversations import (
    INFERENCE_DATASET,
    EmbeddedConversation,
    MaskRef,
    ParsedConversation,
    parse_conversation,
    read_rgb,
)
from segllm_jax.data.example import Example
from segllm_jax.data.registers import AnnotationRegistry, resolve_image_path
from segllm_jax.errors import InputError
from segllm_jax.preprocess import CLIP_IMAGE_SIZE, HIPIE_IMAGE_SIZE, clip_image, hipie_image, hipie_mask, masked_crop
from segllm_jax.prompt import ConversationEncoder, EncodedConversation, rounds_that_fit

#: Conversation length the original trained with (``model_max_length``, §T13).
DEFAULT_MAX_LENGTH = 2048


def _extent(mask: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise InputError(f"{what} is empty.")
    return rows, cols


class _Masks:
    """Masks of one conversation's image, each looked up once: original resolution and HIPIE frame.

    ``lookup(dataset, mask_id)`` reads a register (JSON layout) or the record itself (TFDS layout).
    """

    def __init__(self, lookup: Callable[[str, str], np.ndarray], image_hw: tuple[int, int], frame: int) -> None:
        self._lookup, self._hw, self._frame = lookup, image_hw, frame
        self._raw: dict[tuple[str, str], np.ndarray] = {}
        self._framed: dict[tuple[str, str], np.ndarray] = {}

    def raw(self, dataset: str, mask_id: str) -> np.ndarray:
        key = (dataset, mask_id)
        if key not in self._raw:
            if dataset == INFERENCE_DATASET:  # §D1: dummy all-ones target, no lookup
                self._raw[key] = np.ones(self._hw, bool)
            else:
                mask = self._lookup(dataset, mask_id)
                if mask.shape != self._hw:  # registers check this too; a record's masks only here
                    raise InputError(f"mask {mask_id!r} of {dataset} is {mask.shape[0]}x{mask.shape[1]} but the "
                                     f"image is {self._hw[0]}x{self._hw[1]}.")
                self._raw[key] = mask
        return self._raw[key]

    def framed(self, dataset: str, mask_id: str) -> np.ndarray:
        """Boolean mask in the 1024 resized-and-padded frame (§D5)."""
        key = (dataset, mask_id)
        if key not in self._framed:
            self._framed[key] = hipie_mask(self.raw(dataset, mask_id), self._frame) > 0
        return self._framed[key]


@dataclasses.dataclass
class ExampleBuilder:
    """One conversation JSON entry -> one :class:`~segllm_jax.data.example.Example` (see :meth:`build`)."""

    encoder: ConversationEncoder
    registry: AnnotationRegistry
    images_root: Path
    limit_rounds: int | None = 6
    max_length: int = DEFAULT_MAX_LENGTH
    clip_size: int = CLIP_IMAGE_SIZE
    frame: int = HIPIE_IMAGE_SIZE
    is_eval: bool = False
    # grain reads with several threads; one HF fast tokenizer is not guaranteed to be thread-safe
    _tokenizer_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _tokenizer_lock=threading.Lock())

    def build(self, entry: Any) -> Example:
        """The :class:`~segllm_jax.data.example.Example` of ``entry`` (C = ``clip_size``, S = ``frame``).

        ``entry`` is a JSON entry (image file and registers) or an :class:`EmbeddedConversation`.
        """
        embedded = entry if isinstance(entry, EmbeddedConversation) else None
        conversation = parse_conversation(entry if embedded is None else embedded.entry, self.limit_rounds)
        encoded = self._encode(conversation)
        rounds = conversation.rounds[: len(encoded.rounds)]
        pixels, masks = self._image_and_masks(conversation, embedded)
        hipie, resized_hw = hipie_image(Image.fromarray(pixels), self.frame)
        refs = [(k, ref) for k, r in enumerate(rounds) for ref in r.references]
        crops, boxes = self._references(pixels, masks, [ref for _, ref in refs])
        targets, aux, has_aux = self._decode_masks(rounds, masks)
        layouts = encoded.rounds
        return Example(
            input_ids=encoded.input_ids,
            labels=encoded.labels,
            round_ends=np.asarray([r.end for r in layouts], np.int32),
            image_positions=np.concatenate([r.image_positions for r in layouts]).astype(np.int32),
            seg_positions=encoded.seg_positions,
            ref_mask_positions=np.concatenate([r.mask_encode_positions for r in layouts]).astype(np.int32),
            ref_box_positions=np.concatenate([r.box_encode_positions for r in layouts]).astype(np.int32),
            ref_rounds=np.asarray([k for k, _ in refs], np.int32),
            clip_image=clip_image(pixels, self.clip_size),
            hipie_image=hipie,
            hipie_size=np.asarray(resized_hw, np.int32),
            ref_crops=crops,
            ref_boxes=boxes,
            target_masks=targets,
            aux_masks=aux,
            has_aux=has_aux,
            conv_id=str(conversation.conv_id or ""),
        )

    def _image_and_masks(self, conversation: ParsedConversation,
                         embedded: EmbeddedConversation | None) -> tuple[np.ndarray, _Masks]:
        """Pixels and masks from the record itself, or from the image file and the registers."""
        if embedded is not None:
            pixels = read_rgb(embedded.image)
            return pixels, _Masks(lambda dataset, mask_id: embedded.mask(mask_id), pixels.shape[:2], self.frame)
        pixels = read_rgb(resolve_image_path(self.images_root, conversation.image))

        def registered(dataset: str, mask_id: str) -> np.ndarray:
            return self.registry.mask(dataset, mask_id, conversation.image, pixels.shape[:2], is_eval=self.is_eval)

        return pixels, _Masks(registered, pixels.shape[:2], self.frame)

    def _encode(self, conversation: ParsedConversation) -> EncodedConversation:
        """Token ids, cut after the last round that fits ``max_length`` (the original truncated at
        2048 tokens mid-round, losing ``<seg>`` tokens it then failed to count)."""
        with self._tokenizer_lock:
            encoded = self.encoder.encode(conversation.tokenizer_rounds())
        fit = rounds_that_fit(encoded, self.max_length)
        if fit == 0:
            raise InputError(f"round 1 of conversation {conversation.conv_id!r} alone exceeds "
                             f"{self.max_length} tokens.")
        end = encoded.rounds[fit - 1].end
        return EncodedConversation(encoded.input_ids[:end], encoded.labels[:end], encoded.rounds[:fit])

    def _references(self, pixels: np.ndarray, masks: _Masks,
                    refs: Sequence[MaskRef]) -> tuple[np.ndarray, np.ndarray]:
        """Mask-encode crops and box-encode boxes as in training (§D6).

        Crop: image AND mask, cut to the mask's box at original resolution (exclusive ends), pasted
        top-left into a zero square, CLIP-preprocessed. Box: extents of the mask in the HIPIE frame
        with inclusive max, ``[r0, c0, r1, c1] / frame``. INFERENCE references get the original's
        dummies: the unmasked image and a zero box.
        """
        crops = np.zeros((len(refs), self.clip_size, self.clip_size, 3), np.float32)
        boxes = np.zeros((len(refs), 4), np.float32)
        for i, ref in enumerate(refs):
            if ref.dataset == INFERENCE_DATASET:
                crops[i] = clip_image(pixels, self.clip_size)
                continue
            what = f"reference mask {ref.mask_id!r} of {ref.dataset}"
            rows, cols = _extent(masks.raw(ref.dataset, ref.mask_id), what)
            box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            crops[i] = clip_image(masked_crop(pixels, masks.raw(ref.dataset, ref.mask_id), box), self.clip_size)
            rows, cols = _extent(masks.framed(ref.dataset, ref.mask_id), what + " in the HIPIE frame")
            boxes[i] = np.asarray([rows[0], cols[0], rows[-1], cols[-1]], np.float32) / self.frame
        return crops, boxes

    def _decode_masks(self, rounds: Sequence[Any], masks: _Masks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per ``<seg>``: target mask and the supervised reference (``aux``) in the HIPIE frame (§D5, §T1).

        An empty target (e.g. an instance that vanishes when resized) cannot be supervised and makes
        the example corrupt. Unlike the original, a reference id ``0`` counts as a reference (its
        ``if ref_mask_id:`` dropped it).
        """
        n = len(rounds)
        targets = np.zeros((n, self.frame, self.frame), bool)
        aux = np.zeros((n, self.frame, self.frame), bool)
        has_aux = np.zeros(n, bool)
        for k, r in enumerate(rounds):
            dataset = r.target.dataset
            targets[k] = masks.framed(dataset, r.target.target_id)
            _extent(targets[k], f"target mask {r.target.target_id!r} of {dataset}")
            ref_id = r.target.supervised_ref_id
            if ref_id not in (None, "", "'", "none") and dataset != INFERENCE_DATASET:
                aux[k], has_aux[k] = masks.framed(dataset, ref_id), True
        return targets, aux, has_aux
