"""``MultiRoundSession``: one image, many rounds, earlier answers usable as [REF:k] (architecture.md §D10, §E3).

The original rebuilds and re-runs the whole conversation every round. Here work is done once:

* per image: CLIP patch features (-> projected image embeddings) and HIPIE's backbone pass;
* per round: only the round's new tokens go through the LLM, on top of the KV cache of the
  earlier rounds (causal attention makes this exact), then HIPIE decodes the one new prompt.

``mode="recompute"`` rebuilds the whole conversation each round like the original; both modes
give the same hidden states and masks (tested). Reference products are computed when a round
finishes, as the original CLI stores them: the masked crop of the 1024 HIPIE frame (CLIP
preprocessed) and the box ``[y0, x0, y1, x1] / 1024``.

:func:`run_round` is the one LLM step of a round, for a batch of conversations (row b: image b)
sharing one cache: the session runs it with one row, ``segllm-jax infer`` with a group of
conversations (:mod:`segllm_jax.apps.infer`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from segllm_jax import preprocess
from segllm_jax.batch import LENGTH_BUCKET, ConversationBatch, Reference, bucketed, collate, forward
from segllm_jax.checkpoint import Loaded
from segllm_jax.config import SegLLMConfig
from segllm_jax.errors import InputError
from segllm_jax.models.hipie.model import image_features_jit, predict
from segllm_jax.models.llama import KVCache
from segllm_jax.models.segllm import SegLLM
from segllm_jax.outputs import atomic_save_image
from segllm_jax.prompt import ConversationEncoder, EncodedConversation, Round, check_fits, parse_references
from segllm_jax.tokenizer import SegTokenizer

Mode = Literal["incremental", "recompute"]


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """One round's answer. Boxes are ``(x0, y0, x1, y1)`` pixels."""

    index: int  # 1-based round number, as [REF:k] counts
    text: str  # the question with its [REF:k] tags removed
    refs: tuple[int, ...]
    mask: np.ndarray  # [H, W] bool at the original image resolution
    mask_frame: np.ndarray  # [S, S] bool in HIPIE's resized-and-padded frame
    box_frame: np.ndarray  # [4] in the frame, not clipped (the original does not clip)
    box: np.ndarray  # [4] in original-image pixels, clipped to the image
    score: float
    prompt_hidden: np.ndarray  # [D] hidden state before <seg> (the [SEG] prompt's input)
    prompt: np.ndarray  # [8, 768] HIPIE prompt tokens
    ref_crop: np.ndarray  # [224, 224, 3] CLIP-preprocessed masked crop (for later references)
    ref_box: np.ndarray  # [4] [y0, x0, y1, x1] / frame (for later references)

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


@dataclasses.dataclass(frozen=True)
class ImageContext:
    """Host-side views of one image: the picture, HIPIE's frame and CLIP's input."""

    image: Image.Image  # RGB, EXIF orientation applied
    frame_u8: np.ndarray  # [S, S, 3] resized (long side S) and zero-padded
    resized_hw: tuple[int, int]  # (h', w') of the image inside the frame
    clip_pixels: np.ndarray  # [224, 224, 3] CLIP-preprocessed

    @classmethod
    def prepare(cls, source: preprocess.ImageSource, cfg: SegLLMConfig) -> "ImageContext":
        image = preprocess.load_image(source)
        frame_u8, resized_hw = preprocess.hipie_image(image, cfg.hipie_image_size)
        return cls(image, frame_u8, resized_hw, preprocess.clip_image(image, cfg.vision.image_size))


def next_round(encoder: ConversationEncoder, conversation: EncodedConversation, text: str,
               context_length: int) -> tuple[EncodedConversation, str, list[int]]:
    """``conversation`` extended by the user's ``text`` (``[REF:k]`` tags cite earlier rounds), with the
    question (tags removed) and the rounds it cites. Bad input raises :class:`InputError`: a malformed
    or future reference, an empty question, a conversation longer than ``context_length``."""
    question, refs = parse_references(text, num_previous_rounds=len(conversation.rounds))
    if not question.strip():
        raise InputError("The question is empty; type what to segment.")
    extended = encoder.append(conversation, Round(question, len(refs), not conversation.rounds))
    check_fits(extended, context_length)  # its sentence says what to do
    return extended, question, refs


def round_result(ctx: ImageContext, cfg: SegLLMConfig, index: int, question: str, refs: list[int],
                 mask_frame: np.ndarray, box_frame: np.ndarray, score: float, hidden, prompt) -> RoundResult:
    """A round's answer in the user's frame, plus the products later references need (§D6, §E3)."""
    reference = Reference.of_prediction(ctx.frame_u8, mask_frame, box_frame, cfg.hipie_image_size,
                                        cfg.vision.image_size)
    h, w = ctx.resized_hw
    width, height = ctx.image.size
    mask = np.asarray(Image.fromarray(mask_frame[:h, :w]).resize((width, height), Image.NEAREST))
    scale = np.asarray([width / w, height / h, width / w, height / h])
    box = np.clip(box_frame * scale, 0, [width, height, width, height])
    return RoundResult(
        index=index, text=question, refs=tuple(refs), mask=mask, mask_frame=mask_frame, box_frame=box_frame,
        box=box.astype(np.float32), score=float(score), prompt_hidden=np.asarray(hidden), prompt=np.asarray(prompt),
        ref_crop=reference.crop, ref_box=reference.box)


def save_round(result: RoundResult, image: Image.Image, folder: Path, prefix: str = "") -> dict:
    """Writes ``round_<r>.png`` (the overlay on ``image``) and ``round_<r>_mask.png`` into ``folder``, each
    atomically, and returns the round's ``results.json`` entry; its file names start with ``prefix`` (the
    folder's path relative to that ``results.json``)."""
    r = result.index
    atomic_save_image(folder / f"round_{r}.png", blend(image, result.mask))
    atomic_save_image(folder / f"round_{r}_mask.png", Image.fromarray(result.mask.astype(np.uint8) * 255))
    return {"round": r, "text": result.text, "refs": list(result.refs),
            "box": [round(float(v), 2) for v in result.box], "score": round(result.score, 6),
            "mask": f"{prefix}round_{r}_mask.png", "overlay": f"{prefix}round_{r}.png",
            "mask_pixels": int(result.mask.sum())}


def blend(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    """The original CLI's overlay: mask pixels = 0.5 image + 0.5 colour."""
    arr = np.asarray(image, np.float32)
    out = np.where(mask[..., None], 0.5 * arr + 0.5 * np.asarray(color, np.float32), arr)
    return Image.fromarray(out.astype(np.uint8))


REFERENCE_BUCKET = 4  # reference slots are padded to a multiple of this (gate 0): few compiled shapes
CACHE_BUCKET = 4 * LENGTH_BUCKET  # a cache's capacity is a multiple of this


@nnx.jit
def image_embeds_jit(model: SegLLM, clip_pixels: jax.Array) -> jax.Array:
    """Projected CLIP patch features ``[I, P, D]`` of CLIP-preprocessed images ``[I, 224, 224, 3]``."""
    return model.image_embeds(clip_pixels)


@nnx.jit
def _round_prompts(model: SegLLM, batch: ConversationBatch, cache: KVCache | None, image_embeds: jax.Array):
    out, prompts = forward(model, batch, cache, image_embeds)
    hidden = out.hidden[batch.seg_rows, batch.seg_cols - 1]
    return hidden, prompts, None if cache is None else out.cache


def cited(results: Sequence[RoundResult], refs_per_round: Iterable[Sequence[int]]) -> list[list[Reference]]:
    """Each round's references (1-based round numbers) as the reference inputs of the rounds they cite."""
    return [[Reference(results[k - 1].ref_crop, results[k - 1].ref_box) for k in refs] for refs in refs_per_round]


def chunk_start(conversation: EncodedConversation, incremental: bool) -> int:
    """Where the tokens a round pushes through the LLM begin: its newest round's start (the earlier
    rounds are in the cache) or, recomputing, the first token."""
    return conversation.rounds[-1].start if incremental and conversation.rounds else 0


def chunk_length(conversations: Iterable[EncodedConversation], incremental: bool) -> int:
    """Columns of one :func:`run_round` batch: its longest chunk, bucketed (jit compiles per shape)."""
    return bucketed(max((c.num_tokens - chunk_start(c, incremental) for c in conversations), default=0))


def cache_for(model: SegLLM, rounds: Sequence[Sequence[EncodedConversation]]) -> KVCache:
    """An empty cache ``[B, C]`` for ``rounds`` (each B conversations, what :func:`run_round` gets in turn),
    with room for every round's chunk, C bucketed: it never has to grow."""
    capacity = sum(chunk_length(now, incremental=True) for now in rounds)
    return KVCache.empty(model.cfg.llm, len(rounds[0]), bucketed(capacity, CACHE_BUCKET))


def with_room(cache: KVCache, tokens: int) -> KVCache:
    """``cache`` with room for ``tokens`` more slots: itself, or grown (bucketed) with free slots."""
    end = int(cache.end)
    if end + tokens <= cache.capacity:
        return cache
    extra = bucketed(end + tokens, CACHE_BUCKET) - cache.capacity

    def grow(x: jax.Array, axis: int) -> jax.Array:  # free slots: zeros, valid=False
        return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])

    return KVCache(grow(cache.k, 2), grow(cache.v, 2), grow(cache.valid, 1), cache.end)


def run_round(model: SegLLM, conversations: Sequence[EncodedConversation],
              references: Sequence[Sequence[Sequence[Reference]]], clip_images: jax.Array, image_embeds: jax.Array,
              cache: KVCache | None) -> tuple[jax.Array, jax.Array, KVCache | None]:
    """The LLM step of every conversation's newest round; conversation b is row b and shows image b.

    With a ``cache`` ``[B, C]`` (holding each conversation's earlier rounds) only the newest rounds'
    tokens go through the LLM; with None every conversation is rebuilt from its first token (the
    original's way). ``references[b][r]``: round r's reference inputs (:func:`cited`). An empty
    conversation is a row of padding (its outputs mean nothing, its cache row stays as it is), so
    conversations of different lengths and numbers of rounds share one batch and one cache. Returns,
    per row, the hidden state before the newest ``<seg>`` ``[B, D]``, its HIPIE prompt ``[B, 8, 768]``,
    and the cache with the new tokens (None when recomputing).
    """
    incremental = cache is not None
    starts = [chunk_start(c, incremental) for c in conversations]
    length = chunk_length(conversations, incremental)
    batch = collate(conversations, clip_images, range(len(conversations)), references,
                    gate=model.cfg.eval_reference_gate, pad_to=length, starts=starts)
    batch = batch.pad(references=bucketed(batch.ref_rows.shape[0], REFERENCE_BUCKET))
    # one prompt per row, before its newest <seg> (an empty row reads its column 0)
    newest = [c.rounds[-1].seg_position - s if c.rounds else 1 for c, s in zip(conversations, starts, strict=True)]
    batch = dataclasses.replace(batch, seg_rows=jnp.arange(len(conversations), dtype=jnp.int32),
                                seg_cols=jnp.asarray(newest, jnp.int32))
    return _round_prompts(model, batch, with_room(cache, length) if incremental else None, image_embeds)


class MultiRoundSession:
    """Multi-round segmentation of one image. ``ask(text)`` runs a round; ``[REF:k]`` cites round k."""

    def __init__(self, model: SegLLM | Loaded, image: preprocess.ImageSource, tokenizer: SegTokenizer | None = None,
                 *, mode: Mode = "incremental"):
        if isinstance(model, Loaded):
            model, tokenizer = model.model, tokenizer or model.tokenizer
        if not isinstance(model, SegLLM):
            raise InputError(f"MultiRoundSession needs a SegLLM checkpoint, got {type(model).__name__}.")
        if tokenizer is None:
            raise InputError("This checkpoint has no tokenizer files; "
                             "pass tokenizer=SegTokenizer.from_pretrained(...).")
        if mode not in ("incremental", "recompute"):
            raise InputError(f"mode must be 'incremental' or 'recompute', not {mode!r}.")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        cfg = model.cfg
        self.encoder = ConversationEncoder(tokenizer, cfg.num_image_tokens)
        self.ctx = ImageContext.prepare(image, cfg)
        self._clip = jnp.asarray(self.ctx.clip_pixels)[None]
        self._image_embeds = image_embeds_jit(model, self._clip)  # [1, P, D], once
        self._levels = image_features_jit(model.segmentator, jnp.asarray(self.ctx.frame_u8)[None])  # once
        self.clear()

    # ---- public API ----------------------------------------------------------------------------
    def clear(self) -> None:
        """Forgets the conversation (keeps the per-image features)."""
        self.rounds: list[RoundResult] = []
        self._conversation = EncodedConversation.empty()
        self._refs_per_round: list[tuple[int, ...]] = []
        self._cache = (KVCache.empty(self.model.cfg.llm, 1, self.model.cfg.context_length + LENGTH_BUCKET)
                       if self.mode == "incremental" else None)

    def ask(self, text: str) -> RoundResult:
        """Runs one round. Bad input raises :class:`InputError` and leaves the session unchanged."""
        conversation, question, refs = next_round(self.encoder, self._conversation, text,
                                                  self.model.cfg.context_length)
        references = cited(self.rounds, [*self._refs_per_round, refs])
        hidden, prompt, cache = run_round(self.model, [conversation], [references], self._clip,
                                          self._image_embeds, self._cache)
        result = self._segment(len(self.rounds) + 1, question, refs, hidden[0], prompt[0])
        # commit only after everything succeeded: a failed round leaves the session as it was
        self._conversation, self._cache = conversation, cache
        self._refs_per_round.append(tuple(refs))
        self.rounds.append(result)
        return result

    @property
    def image(self) -> Image.Image:
        return self.ctx.image

    def overlay(self, result: RoundResult, color: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
        """The original CLI's picture: mask pixels = 0.5 image + 0.5 colour, at the original size."""
        return blend(self.ctx.image, result.mask, color)

    # ---- internals ---------------------------------------------------------------------------
    def _segment(self, index: int, question: str, refs: list[int], hidden: jax.Array,
                 prompt: jax.Array) -> RoundResult:
        pred = predict(self.model.segmentator, None, prompt[None], [0], levels=self._levels)
        return round_result(self.ctx, self.model.cfg, index, question, refs, pred.masks[0], pred.boxes_xyxy[0],
                            pred.scores[0], hidden, prompt)
