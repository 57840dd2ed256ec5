"""TFDS datasets (array_record) as conversation sources of the training pipeline, without TensorFlow.

Why: a TFDS split is one random-access file set with its schema and split sizes beside it, which is
how large datasets (RefCOCO prepared by TFDS's public ``ref_coco`` builder) already exist on many
machines, and a single artefact is easier to ship than an image folder + JSON + register.

Two layouts are read, each record turned into a :class:`~segllm_jax.data.conversations.EmbeddedConversation`
(conversation JSON entry + image bytes + the masks it names), so the example builder, the batch plan
and the skip accounting are those of JSON files, and one TFDS split is one "file" of a mixture:

* MR-Shapes (:func:`write_mrshapes`): one record per conversation: ``id``, ``task``,
  ``image/filename``, ``image`` (PNG), ``conversations`` (the JSON turns) and ``masks`` (register id
  + one 1-bit PNG per instance). Records are the scenes of ``mrshapes.write_split`` in scene order,
  so both layouts of one seed hold the same conversations.
* ``ref_coco``: one record per image with ``objects{id, mask, refexp{refexp_id, raw}, ...}``;
  every (object, refexp) pair is a single-round conversation "``[IMAGE256:...] <raw>``" whose target
  is that object's mask. Records that cannot be decoded are left out of the index and counted
  (:attr:`RefCocoConversations.skipped`); later failures (a corrupt image, an empty mask) raise in
  the example builder, which the pipeline counts and replaces like any bad JSON entry.

TensorFlow is never imported. Reading uses ``tfds.builder_from_directory(...).as_data_source``
(array_record + NumPy/PIL decoding). Writing uses tfds 4.9.10's own builder machinery, which needs TF
only for things MR-Shapes avoids: encoding NumPy images (we pass PNG bytes) and serialising sequences
of sequences (MR-Shapes has none; the ``ref_coco`` features have one, so that layout is written by
TFDS with TF, as its builder always was). Its download step also looks for a checksums file next to
the builder's source through the ``importlib_resources`` backport, which tfds no longer declares as
a dependency; a generated dataset downloads nothing, so the MR-Shapes builder declares no source path.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segllm_jax.data import mrshapes
from segllm_jax.data.conversations import EmbeddedConversation
from segllm_jax.errors import ConfigError, InputError

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

MRSHAPES_VERSION = "1.0.0"
#: MR-Shapes split -> TFDS split (TFDS calls the held-out split "validation").
TFDS_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


# ----------------------------------------------------------------------------------------------
# Writing MR-Shapes


def _mrshapes_features() -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "id": text(),
        "task": text(),
        "image/filename": text(),  # relative to the JSON layout's images folder, as in the placeholders
        "image": tfds.features.Image(encoding_format="png"),
        "conversations": tfds.features.Sequence({"from": text(), "value": text()}),
        "masks": tfds.features.Sequence({
            "id": text(),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        }),
    })


def _png(mask: np.ndarray) -> bytes:
    """1-bit PNG: tfds would encode a NumPy image with TensorFlow, so images are handed over encoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buffer, format="PNG")
    return buffer.getvalue()


class MRShapesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MR-Shapes splits of one seed as a TFDS dataset; ``sizes`` maps MR-Shapes splits to scene counts.

    Records keep scene order (``disable_shuffling``): record i is scene i, as in the JSON files, and a
    split of n scenes stays a prefix of a split of n+k. The request is stored as the dataset's
    metadata so that a folder prepared with other parameters is recognised, not silently reused.
    """

    name = "mrshapes"
    VERSION = tfds.core.Version(MRSHAPES_VERSION)
    code_path = None  # nothing to download, so no checksums file to look for (see module docstring)

    def __init__(self, *, sizes: Mapping[str, int], seed: int, max_rounds: int, **kwargs: Any) -> None:
        for split, n in sizes.items():
            mrshapes.check_split_request(split, n, seed, max_rounds)
        self.request = {"seed": seed, "max_rounds": max_rounds,
                        "sizes": {TFDS_SPLIT_NAMES[s]: int(n) for s, n in sizes.items() if n > 0}}
        if not self.request["sizes"]:
            raise InputError("a TFDS dataset needs at least one non-empty split.")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MR-Shapes: procedurally generated multi-round referring segmentation "
                        "(segllm_jax.data.mrshapes), one record per conversation.",
            features=_mrshapes_features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self.request),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        by_tfds_name = {tfds_name: split for split, tfds_name in TFDS_SPLIT_NAMES.items()}
        return {name: self._generate_examples(by_tfds_name[name], n) for name, n in self.request["sizes"].items()}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for index in range(n):
            record = mrshapes.scene_record(self.request["seed"], split, index, self.request["max_rounds"])
            yield index, {
                "id": record.entry["id"],
                "task": record.entry["task"],
                "image/filename": record.image,
                "image": record.png,
                "conversations": record.entry["conversations"],
                "masks": [{"id": m, "mask": _png(mask)} for m, mask in record.masks.items()],
            }


def write_mrshapes(data_dir: PathLike, sizes: Mapping[str, int], seed: int, max_rounds: int = 6) -> Path:
    """Write MR-Shapes ``{split: n}`` (``mrshapes.SPLITS`` names) as a TFDS dataset under ``data_dir``.

    Returns the dataset folder (``<data_dir>/mrshapes/<version>``) that mixtures and
    ``tfds.builder_from_directory`` name. A folder already prepared with the same request is kept;
    one prepared with another raises :class:`InputError`.
    """
    builder = MRShapesBuilder(sizes=sizes, seed=seed, max_rounds=max_rounds, data_dir=os.fspath(data_dir),
                              file_format="array_record")
    folder = Path(builder.data_dir)
    if builder.is_prepared():
        stored = dict(tfds.builder_from_directory(os.fspath(folder)).info.metadata or {})
        if stored != builder.request:
            raise InputError(f"{folder} already holds MR-Shapes {stored}, not {builder.request}; "
                             "remove it or choose another folder.")
        return folder
    builder.download_and_prepare()
    return folder


# ----------------------------------------------------------------------------------------------
# Reading


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _binary(mask: np.ndarray) -> np.ndarray:
    """Boolean [H, W] of a decoded mask image: PIL gives 1-bit PNGs as 0/1, OpenCV and TF as 0/255,
    and ``ref_coco`` declares its masks with 3 channels, so any non-zero channel counts."""
    return np.any(np.asarray(mask) > 0, axis=-1)


def _data_source(path: Path, split: str) -> Any:
    """``as_data_source`` of a prepared dataset folder, with the image left encoded: the example
    builder decodes it exactly as it decodes image files, so both layouts give identical pixels."""
    try:
        builder = tfds.builder_from_directory(os.fspath(path))
    except OSError as err:
        raise ConfigError(f"{path} is not a prepared TFDS dataset folder (the folder holding "
                          f"dataset_info.json): {err}") from None
    if split not in builder.info.splits:
        raise ConfigError(f"TFDS dataset {path} has splits {sorted(builder.info.splits)}, not {split!r}.")
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        raise ConfigError(f"TFDS dataset {path} is stored as {file_format and file_format.value}; random "
                          "access needs array_record (tfds build ... --file_format=array_record).")
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


class _TfdsConversations:
    """A split as a sequence of conversations; the open data source is not pickled (grain workers
    reopen it from the folder), anything else (e.g. an index) is."""

    def __init__(self, path: PathLike, split: str, limit: int | None, source: Any) -> None:
        self.path, self.split, self.limit = Path(path), split, limit
        self._source = source
        self.name = f"{source.dataset_info.full_name}:{split}"

    @property
    def source(self) -> Any:
        if self._source is None:
            self._source = _data_source(self.path, self.split)
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self)})"


class MRShapesConversations(_TfdsConversations):
    """MR-Shapes records, each the same entry and masks as the JSON split's conversation."""

    def __len__(self) -> int:
        return min(len(self.source), self.limit) if self.limit is not None else len(self.source)

    def __getitem__(self, index: int) -> EmbeddedConversation:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name} has {len(self)} conversations, not {index + 1}.")
        record = self.source[index]
        turns = zip(record["conversations"]["from"], record["conversations"]["value"], strict=True)
        entry = {"id": _text(record["id"]), "task": _text(record["task"]),
                 "conversations": [{"from": _text(f), "value": _text(v)} for f, v in turns]}
        masks = {_text(m): _binary(mask)
                 for m, mask in zip(record["masks"]["id"], record["masks"]["mask"], strict=True)}
        return EmbeddedConversation(entry=entry, image=record["image"], masks=masks)


class RefCocoConversations(_TfdsConversations):
    """``ref_coco`` records as single-round conversations, one per (object, refexp).

    The index of (record, object, refexp) is built once when the split is opened: every record is
    decoded then (except its image), and one that fails is left out, logged and counted in
    ``skipped``. Placeholders name the image ``<dataset>/<image id>`` and the mask by COCO annotation
    id, i.e. what a refcoco JSON conversation would say, with the pixels taken from the record.
    """

    def __init__(self, path: PathLike, split: str, limit: int | None, source: Any) -> None:
        super().__init__(path, split, limit, source)
        self.dataset = source.dataset_info.name
        index: list[tuple[int, int, int]] = []
        self.skipped: list[str] = []
        for i in range(len(source)):
            try:
                refexps = source[i]["objects"]["refexp"]["raw"]
            except Exception as err:  # noqa: BLE001 - a corrupt record must not stop the whole dataset
                self.skipped.append(f"{self.name}[{i}]: {type(err).__name__}: {err}")
                log.warning("skipped record %s (%d skipped so far)", self.skipped[-1], len(self.skipped))
                continue
            index += [(i, j, k) for j, texts in enumerate(refexps) for k in range(len(texts))]
        self.index = np.asarray(index[:limit] if limit is not None else index, np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> EmbeddedConversation:
        record_index, obj, refexp = (int(v) for v in self.index[index])
        record = self.source[record_index]
        objects, image_id = record["objects"], int(record["image/id"])
        image = f"{self.dataset}/{image_id}"
        mask_id = str(int(objects["id"][obj]))
        refexp_id = int(objects["refexp"]["refexp_id"][obj][refexp])
        raw = _text(objects["refexp"]["raw"][obj][refexp])
        entry = {"id": f"{self.dataset}_{image_id}_{mask_id}_{refexp_id}", "task": "segmentation",
                 "conversations": [{"from": "human", "value": f"[IMAGE256:{image}] {raw}"},
                                   {"from": "gpt", "value": f"[MASK-DECODE:{image}|{self.dataset}|{mask_id}]"}]}
        return EmbeddedConversation(entry=entry, image=record["image"], masks={mask_id: _binary(objects["mask"][obj])})


def open_conversations(path: PathLike, split: str,
                       limit: int | None = None) -> MRShapesConversations | RefCocoConversations:
    """The first ``limit`` conversations of ``split`` of the prepared TFDS dataset folder ``path``
    (MR-Shapes or ``ref_coco`` layout, told apart by their features)."""
    source = _data_source(Path(path), split)
    keys = set(source.dataset_info.features.keys())
    if {"conversations", "masks", "image"} <= keys:
        return MRShapesConversations(path, split, limit, source)
    if {"objects", "image", "image/id"} <= keys:
        return RefCocoConversations(path, split, limit, source)
    raise ConfigError(f"TFDS dataset {path} has features {sorted(keys)}: neither the MR-Shapes layout "
                      "(conversations, masks) nor ref_coco's (image/id, objects).")
