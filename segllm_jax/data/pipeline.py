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
* :class:`~segllm_jax.data.example_builder.ExampleBuilder` (its own module) — one JSON entry -> one
  :class:`~segllm_jax.data.example.Example` (token ids/labels, CLIP image, HIPIE image, reference crops/boxes
  of §D6, GT masks per ``<seg>`` in the 1024 frame).
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
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import grain
import numpy as np

from segllm_jax.data.example import Example
from segllm_jax.data.example_builder import DEFAULT_MAX_LENGTH, ExampleBuilder
from segllm_jax.data.mixture import ConversationFile, MixtureConfig  # noqa: F401  (ConversationFile re-exported)
from segllm_jax.data.registers import AnnotationRegistry, load_json
from segllm_jax.errors import ConfigError, InputError
from segllm_jax.preprocess import CLIP_IMAGE_SIZE, HIPIE_IMAGE_SIZE
from segllm_jax.prompt import DEFAULT_NUM_IMAGE_TOKENS, ConversationEncoder
from segllm_jax.tokenizer import SegTokenizer

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

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
