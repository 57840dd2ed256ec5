"""``MultiRoundSession``: one image, many rounds, earlier answers usable as [REF:k] (architecture.md §D10, §E3).

The original rebuilds and re-runs the whole conversation every round. Here work is done once:

* per image: CLIP patch features (-> projected image embeddings) and HIPIE's backbone pass;
* per round: only the round's new tokens go through the LLM, on top of the KV cache of the
  earlier rounds (causal attention makes this exact), then HIPIE decodes the one new prompt.

``mode="recompute"`` rebuilds the whole conversation each round like the original; both modes
give the same hidden states and masks (tested). Reference products are computed when a round
finishes, as the original CLI stores them: the masked crop of the 1024 HIPIE frame (CLIP
preprocessed) and the box ``[y0, x0, y1, x1] / 1024``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from segllm_jax import preprocess
from segllm_jax.batch import LENGTH_BUCKET, Reference, bucketed
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


@nnx.jit
def _image_embeds(model: SegLLM, clip_pixels: jax.Array) -> jax.Array:
    return model.image_embeds(clip_pixels)


@nnx.jit
def _reference_embeds(model: SegLLM, crops: jax.Array, boxes: jax.Array, gate: float) -> tuple[jax.Array, jax.Array]:
    return gate * model.mask_encode(crops), gate * model.box_encode(boxes)


@nnx.jit
def _llm_chunk(model: SegLLM, ids: jax.Array, token_mask: jax.Array, cols: jax.Array, values: jax.Array,
               cache: KVCache, prompt_col: jax.Array):
    """Pushes one chunk ``[1, T]`` through the LLM on top of ``cache``; returns the prompt's hidden state."""
    embeds = model.inputs_embeds(ids, jnp.zeros_like(cols), cols, values)
    out = model.run_llm(embeds, token_mask, cache)
    hidden = out.hidden[0, prompt_col]  # [D]
    prompt = model.seg_prompts(out.hidden, jnp.zeros((1,), jnp.int32), prompt_col[None])[0]  # [8, 768]
    return hidden, prompt, out.cache


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
        self._image_embeds = _image_embeds(model, jnp.asarray(self.ctx.clip_pixels)[None])[0]  # [P, D], once
        self._levels = image_features_jit(model.segmentator, jnp.asarray(self.ctx.frame_u8)[None])  # once
        self.clear()

    # ---- public API ----------------------------------------------------------------------------
    def clear(self) -> None:
        """Forgets the conversation (keeps the per-image features)."""
        self.rounds: list[RoundResult] = []
        self._conversation = EncodedConversation.empty()
        self._refs_per_round: list[tuple[int, ...]] = []
        self._cache = KVCache.empty(self.model.cfg.llm, 1, self._capacity)

    def ask(self, text: str) -> RoundResult:
        """Runs one round. Bad input raises :class:`InputError` and leaves the session unchanged."""
        conversation, question, refs = next_round(self.encoder, self._conversation, text,
                                                  self.model.cfg.context_length)
        if self.mode == "incremental":
            hidden, prompt, cache = self._run_incremental(conversation, refs)
        else:
            hidden, prompt, cache = self._run_recompute(conversation, refs)
        result = self._segment(len(self.rounds) + 1, question, refs, hidden, prompt)
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
    @property
    def _capacity(self) -> int:
        return self.model.cfg.context_length + LENGTH_BUCKET

    def _slot_values(self, conversation: EncodedConversation, start: int,
                     refs: list[int], round_ids: range) -> tuple[np.ndarray, jax.Array]:
        """Columns (relative to ``start``) and values of every <video> slot in rounds ``round_ids``."""
        cols, values = [], []
        for r in round_ids:
            layout = conversation.rounds[r]
            if layout.image_positions.size:
                cols.append(layout.image_positions - start)
                values.append(self._image_embeds)
            round_refs = refs if r == len(conversation.rounds) - 1 else self._refs_per_round[r]
            if round_refs:
                crops = jnp.asarray(np.stack([self.rounds[k - 1].ref_crop for k in round_refs]))
                boxes = jnp.asarray(np.stack([self.rounds[k - 1].ref_box for k in round_refs]))
                mask_emb, box_emb = _reference_embeds(self.model, crops, boxes, self.model.cfg.eval_reference_gate)
                cols += [layout.mask_encode_positions - start, layout.box_encode_positions - start]
                values += [mask_emb, box_emb]
        if not cols:  # a later round without references: nothing to add
            return np.zeros(0, np.int32), jnp.zeros((0, self.model.cfg.llm.hidden_size), jnp.float32)
        return np.concatenate(cols).astype(np.int32), jnp.concatenate(values, axis=0)

    def _run_chunk(self, conversation: EncodedConversation, start: int, round_ids: range, refs: list[int],
                   cache: KVCache):
        ids = conversation.input_ids[start:]
        t = ids.shape[0]
        padded = bucketed(t)
        if int(cache.end) + padded > cache.capacity:
            padded = t  # no room left for padding: one more compilation instead
        ids_p = np.zeros((1, padded), np.int32)
        ids_p[0, :t] = ids
        token_mask = np.arange(padded)[None] < t
        cols, values = self._slot_values(conversation, start, refs, round_ids)
        prompt_col = jnp.asarray(conversation.rounds[-1].seg_position - 1 - start, jnp.int32)
        return _llm_chunk(self.model, jnp.asarray(ids_p), jnp.asarray(token_mask), jnp.asarray(cols), values,
                          cache, prompt_col)

    def _run_incremental(self, conversation: EncodedConversation, refs: list[int]):
        start = conversation.rounds[-1].start
        n = len(conversation.rounds)
        return self._run_chunk(conversation, start, range(n - 1, n), refs, self._cache)

    def _run_recompute(self, conversation: EncodedConversation, refs: list[int]):
        cache = KVCache.empty(self.model.cfg.llm, 1, self._capacity)
        return self._run_chunk(conversation, 0, range(len(conversation.rounds)), refs, cache)

    def _segment(self, index: int, question: str, refs: list[int], hidden: jax.Array,
                 prompt: jax.Array) -> RoundResult:
        pred = predict(self.model.segmentator, None, prompt[None], [0], levels=self._levels)
        return round_result(self.ctx, self.model.cfg, index, question, refs, pred.masks[0], pred.boxes_xyxy[0],
                            pred.scores[0], hidden, prompt)
