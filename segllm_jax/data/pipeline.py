"""Training/eval input pipeline: conversation files -> batches of model-ready NumPy examples (grain).

Structure (all host-side NumPy; JAX is used for nothing but the pytree of an Example):

* :class:`ConversationSource` — a grain ``RandomAccessDataSource`` over every (file, index) of the
  mixture's conversation files. A split of a prepared TFDS dataset (``ConversationFile.tfds_split``,
  read by ``segllm_jax.data.tfds_sources``) is one such file; its entries are
  :class:`~segllm_jax.data.conversations.EmbeddedConversation` records that carry their image and masks.
* :class:`BatchPlan` — the original's ``MultiDatasetBatchSampler`` (architecture.md §T13): every step picks ONE
  conversation file (weights uniform by default, seeded per epoch) and draws the whole global batch
  (``batch_size × shard_count``) from it; host ``shard_index`` takes its slice. Steps per epoch =
  total conversations // global batch, as in the original.
* :class:`ExampleBuilder` — one JSON entry -> one :class:`~segllm_jax.data.example.Example` (token
  ids/labels, CLIP image, HIPIE image, reference crops/boxes of §D6, GT masks per ``<seg>`` in the 1024 frame).
* :class:`BatchLoader` — grain map from a global step to that host's batch; a conversation whose
  image/annotation is missing or corrupt is replaced by another draw from the same file and counted.
* :class:`Pipeline` — the grain dataset (optionally with worker processes) and a checkpointable
  iterator (:meth:`PipelineIterator.get_state` / ``set_state``).

Deliberate differences from the original sampler: indices within a file are drawn without
replacement (a seeded permutation per file and pass, consumed a global batch at a time; files
smaller than a global batch are drawn with replacement as in the original), so hosts of one step
never share a conversation and a file is covered before it repeats. The original drew indices with
replacement from the unseeded global NumPy generator, which made runs irreproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import grain
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
from segllm_jax.data.mixture import ConversationFile, MixtureConfig  # noqa: F401  (ConversationFile re-exported)
from segllm_jax.data.registers import AnnotationRegistry, load_json, resolve_image_path
from segllm_jax.errors import ConfigError, InputError
from segllm_jax.preprocess import CLIP_IMAGE_SIZE, HIPIE_IMAGE_SIZE, clip_image, hipie_image, hipie_mask, masked_crop
from segllm_jax.tokenizer import (
    DEFAULT_NUM_IMAGE_TOKENS,
    ConversationEncoder,
    EncodedConversation,
    SegTokenizer,
    rounds_that_fit,
)

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

#: Conversation length the original trained with (``model_max_length``, §T13).
DEFAULT_MAX_LENGTH = 2048


# ----------------------------------------------------------------------------------------------
# Source


class ConversationSource:
    """Random access to every conversation of the mixture, flat over (file, index).

    Entries are read in the constructor (lengths are needed to plan batches) and again lazily in each
    worker process: pickling drops them, so workers are started from paths, not from a copy of
    possibly hundreds of MB of JSON. TFDS splits (``tfds_splits[i]`` set) are opened in the
    constructor and pickled as what they computed on opening, without their records.
    """

    def __init__(self, paths: Sequence[PathLike], max_per_file: int | None = None,
                 tfds_splits: Sequence[str | None] | None = None) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.max_per_file = max_per_file
        splits = tuple(tfds_splits) if tfds_splits is not None else (None,) * len(self.paths)
        if len(splits) != len(self.paths):
            raise ConfigError(f"{len(splits)} TFDS splits for {len(self.paths)} conversation files.")
        self._tables = {i: self._open_tfds(path, split)
                        for i, (path, split) in enumerate(zip(self.paths, splits, strict=True)) if split is not None}
        self._entries: list[Sequence[Any]] | None = None
        self.file_lengths = tuple(len(entries) for entries in self._all_entries())
        self.offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.file_lengths)[:-1]]))

    def _all_entries(self) -> list[Sequence[Any]]:
        if self._entries is None:
            self._entries = [self._tables[i] if i in self._tables else self._read(p)
                             for i, p in enumerate(self.paths)]
        return self._entries

    def _open_tfds(self, path: Path, split: str) -> Sequence[Any]:
        from segllm_jax.data.tfds_sources import open_conversations  # TFDS only for mixtures that name it

        return open_conversations(path, split, self.max_per_file)

    def file_name(self, file_index: int) -> str:
        """What logs call a file: its name, or ``dataset/config/version:split`` for a TFDS split."""
        table = self._tables.get(file_index)
        return table.name if table is not None else self.paths[file_index].name

    def _read(self, path: Path) -> list[Any]:
        try:
            entries = load_json(path)
        except InputError as err:
            raise ConfigError(f"conversation file {path} cannot be used: {err}") from None
        if not isinstance(entries, list):
            raise ConfigError(f"conversation file {path} must hold a JSON list of conversations.")
        return entries[: self.max_per_file] if self.max_per_file is not None else entries

    def __len__(self) -> int:
        return sum(self.file_lengths)

    def __getitem__(self, index: int) -> Any:
        file_index = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.entry(file_index, index - self.offsets[file_index])

    def entry(self, file_index: int, record_index: int) -> Any:
        return self._all_entries()[file_index][record_index]

    def __repr__(self) -> str:
        files = ", ".join(f"{self.file_name(i)}:{n}" for i, n in enumerate(self.file_lengths))
        return f"ConversationSource({files})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_entries": None}


# ----------------------------------------------------------------------------------------------
# Sampler


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which conversations host ``shard_index`` gets at each step (§T13; see module docstring)."""

    file_lengths: tuple[int, ...]
    batch_size: int  # per host
    weights: tuple[float, ...] | None = None  # per file; None = uniform, as the original
    shard_index: int = 0
    shard_count: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or not 0 <= self.shard_index < self.shard_count or self.seed < 0:
            raise ConfigError(f"need batch_size >= 1, 0 <= shard_index < shard_count and seed >= 0, got "
                              f"{self.batch_size}, {self.shard_index}/{self.shard_count}, {self.seed}.")
        if self.weights is not None and len(self.weights) != len(self.file_lengths):
            raise ConfigError(f"{len(self.weights)} weights for {len(self.file_lengths)} conversation files.")
        if self.steps_per_epoch < 1 or not self.probabilities().sum() > 0:
            raise ConfigError(f"{sum(self.file_lengths)} conversations cannot fill one global batch of "
                              f"{self.global_batch} (or every non-empty file has weight 0).")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.shard_count

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.file_lengths) // self.global_batch

    def probabilities(self) -> np.ndarray:
        """File probabilities; empty files never get picked."""
        w = np.ones(len(self.file_lengths)) if self.weights is None else np.asarray(self.weights, np.float64)
        w = np.where(np.asarray(self.file_lengths) > 0, w, 0.0)
        return w / w.sum() if w.sum() > 0 else w

    def host_batch(self, epoch: int, step: int) -> tuple[int, np.ndarray]:
        """(file index, this host's ``batch_size`` record indices in that file) at ``step`` of ``epoch``."""
        files, uses = _epoch_plan(self, epoch)
        file_index, use = int(files[step]), int(uses[step])
        n, g = self.file_lengths[file_index], self.global_batch
        if n >= g:
            cycle, chunk = divmod(use, n // g)
            order = np.random.default_rng([self.seed, epoch, file_index, cycle]).permutation(n)
            picked = order[chunk * g:(chunk + 1) * g]
        else:
            picked = np.random.default_rng([self.seed, epoch, file_index, use]).integers(0, n, g)
        start = self.shard_index * self.batch_size
        return file_index, picked[start:start + self.batch_size]

    def replacement(self, epoch: int, step: int, slot: int, attempt: int, file_index: int) -> int:
        """A deterministic substitute from the same file for a conversation that could not be loaded."""
        rng = np.random.default_rng([self.seed, epoch, step, self.shard_index, slot, attempt, 1])
        return int(rng.integers(self.file_lengths[file_index]))


@functools.lru_cache(maxsize=4)
def _epoch_plan(plan: BatchPlan, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """File of every step of ``epoch`` (same on every host) and how often it was used before."""
    rng = np.random.default_rng([plan.seed, epoch])
    files = rng.choice(len(plan.file_lengths), size=plan.steps_per_epoch, p=plan.probabilities())
    uses = np.zeros_like(files)
    for f in np.unique(files):
        where = np.flatnonzero(files == f)
        uses[where] = np.arange(where.size)
    return files, uses


# ----------------------------------------------------------------------------------------------
# Examples


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


# ----------------------------------------------------------------------------------------------
# Batches


@dataclasses.dataclass
class BatchLoader:
    """grain map: global step -> this host's batch ``{"examples", "epoch", "step", "file_index", "skipped"}``.

    A conversation that cannot be built is replaced by up to ``max_retries`` deterministic draws from
    the same file (the batch must stay single-file); its reason goes to ``skipped`` for the logs. Any
    exception counts: one bad entry must not stop a long run, and the logged reasons say what broke.
    """

    source: ConversationSource
    plan: BatchPlan
    builder: ExampleBuilder
    max_retries: int = 4

    def __call__(self, global_step: int) -> dict[str, Any]:
        epoch, step = divmod(int(global_step), self.plan.steps_per_epoch)
        file_index, records = self.plan.host_batch(epoch, step)
        examples, skipped = [], []
        for slot, record in enumerate(records):
            for attempt in range(self.max_retries + 1):
                if attempt:
                    record = self.plan.replacement(epoch, step, slot, attempt, file_index)
                example, reason = self._try(file_index, int(record))
                if example is not None:
                    examples.append(example)
                    break
                skipped.append(reason)
        return {"examples": examples, "epoch": epoch, "step": step, "file_index": file_index,
                "skipped": skipped}

    def _try(self, file_index: int, record: int) -> tuple[Example | None, str]:
        where = f"{self.source.file_name(file_index)}[{record}]"
        try:
            example = self.builder.build(self.source.entry(file_index, record))
        except Exception as err:  # noqa: BLE001 - see class docstring
            return None, f"{where}: {type(err).__name__}: {err}"
        return dataclasses.replace(example, file_index=file_index, record_index=record), ""


class PipelineIterator:
    """Iterator over batches whose position (and skip count) can be saved and restored exactly."""

    def __init__(self, inner: grain.DatasetIterator) -> None:
        self._inner = inner
        self.skipped = 0

    def __iter__(self) -> PipelineIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next batch with at least one example (steps whose every draw failed are dropped here,
        after their skips are counted, so the output does not depend on the worker count)."""
        while True:
            batch = next(self._inner)
            for reason in batch["skipped"]:
                self.skipped += 1
                log.warning("skipped conversation %s (%d skipped so far)", reason, self.skipped)
            if batch["examples"]:
                return batch

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._inner.get_state(), "skipped": self.skipped}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._inner.set_state(state["grain"])
        self.skipped = int(state["skipped"])

    def close(self) -> None:
        """Stop worker processes now rather than at garbage collection."""
        self._inner.close()


class Pipeline:
    """The grain pipeline of one host: ``num_epochs × steps_per_epoch`` batches, in a fixed order.

    Steps are mapped to batches in ``worker_count`` processes (each takes every ``worker_count``-th
    step, grain interleaves them back in order), so the output does not depend on the worker count.
    """

    def __init__(self, loader: BatchLoader, num_epochs: int = 1, worker_count: int = 0,
                 read_threads: int = 2) -> None:
        if num_epochs < 1 or worker_count < 0 or read_threads < 1:
            raise ConfigError(f"need num_epochs >= 1, worker_count >= 0, read_threads >= 1, got "
                              f"{num_epochs}, {worker_count}, {read_threads}.")
        self.loader = loader
        self.num_epochs = num_epochs
        self.worker_count = worker_count
        self.read_threads = read_threads

    @classmethod
    def from_config(cls, config: MixtureConfig, tokenizer: SegTokenizer, *, batch_size: int, seed: int = 0,
                    shard_index: int = 0, shard_count: int = 1, num_epochs: int = 1, worker_count: int = 0,
                    clip_size: int = CLIP_IMAGE_SIZE, frame: int = HIPIE_IMAGE_SIZE,
                    max_length: int = DEFAULT_MAX_LENGTH, read_threads: int = 2,
                    num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS) -> Pipeline:
        source = ConversationSource(config.paths,
                                    config.max_per_file, [c.tfds_split for c in config.conversations])
        weights = tuple(c.weight for c in config.conversations)
        plan = BatchPlan(source.file_lengths, batch_size, weights, shard_index, shard_count, seed)
        builder = ExampleBuilder(ConversationEncoder(tokenizer, num_image_tokens), AnnotationRegistry(config.registers,
                                                                                    config.annotations_root),
                                 Path(config.images_root), config.limit_rounds, max_length, clip_size, frame,
                                 config.is_eval)
        return cls(BatchLoader(source, plan, builder), num_epochs, worker_count, read_threads)

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.plan.steps_per_epoch

    def dataset(self) -> grain.IterDataset:
        steps = grain.MapDataset.range(self.num_epochs * self.steps_per_epoch).map(self.loader)
        ds = steps.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                     prefetch_buffer_size=2 * self.read_threads))
        if self.worker_count:
            _allow_grain_flags()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return ds

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(iter(self.dataset()))


def _allow_grain_flags() -> None:
    """grain's worker processes read absl flags, which raise unless parsed; outside ``absl.app``
    nothing parses them, so mark them parsed (keeping their defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
