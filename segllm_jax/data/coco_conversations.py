"""Multi-round referring conversations from your own COCO-format annotations (``segllm-jax make-conversations``).

Why: people want to fine-tune on their own annotated images, and what they have is a COCO instances
file (boxes, polygons or RLE, categories), not SegLLM conversations. This module turns one into the
released conversation JSON plus an annotation register, the files ``segllm-jax train`` and ``eval``
read, with the same guarantees as MR-Shapes (:mod:`segllm_jax.data.referring` is shared):

* round 1 names an instance by its category ("the dog"), a superlative the masks support ("the
  largest dog", "the leftmost object"), or, when the file carries RefCOCO-style ``refs``, a
  human-written expression;
* every later round names a new target only through an earlier answer ("the person nearest to
  instance 1", "the nearest object to the left of instance 2"), computed from the masks, unique by a
  margin, and reference-dependent (the same words about another instance give another answer).

Honesty about what is *not* known: an annotation that cannot be used (a crowd region, a degenerate
polygon, a category absent from ``categories``, an undecodable segmentation) is reported and never
becomes a target or a reference, but it still stands in the image (as its mask, or its box) and
competes in every uniqueness test, so "the only dog" is never said of an image with a second,
badly annotated dog. Instances smaller than ``min_target_fraction`` of the image also only compete.
An annotation that cannot even be located makes its image unusable. Every skipped image and
annotation is counted in ``OUT/report.json`` (per image, with the reason) and printed at the end.

Output (``write_conversations``), written as a hidden sibling of OUT and renamed when complete::

    OUT/conversations/<name>.json   released-format conversations; image paths relative to --images
    OUT/annotations/<name>.json     register {annotation id: COCO compressed RLE} of every mask a round
                                    names (read by registers.JsonMaskRegister)
    OUT/data.json                   what ``segllm-jax eval --data`` takes (absolute paths);
                                    :func:`mixture` makes the training ``MixtureConfig`` from OUT
    OUT/report.json                 counts and per-image problems

Deterministic: image i's k-th conversation draws from ``default_rng([seed, i, k])`` (i = position in
the file's ``images`` list), so the same file and seed give the same conversations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from segllm_jax.data.coco import (
    ANNOTATION_PROBLEMS,
    FILE_PROBLEMS,
    IMAGE_PROBLEMS,
    CocoFile,
    CocoLayout,
    Problem,
    check_image_file,
    image_record,
    locate_instance,
    read_coco,
)
from segllm_jax.data.mixture import ConversationFile, MixtureConfig
from segllm_jax.data.referring import (
    EXPRESSION,
    REFERRING_RELATIONS,
    Conversation,
    ConversationRules,
    Query,
    conversation_to_json,
    generate_conversation,
    question_type,
)
from segllm_jax.data.registers import RegisterSpec, load_json
from segllm_jax.data.rle import register_text, rle_encode_compressed
from segllm_jax.errors import InputError
from segllm_jax.outputs import atomic_write_text, written_atomically

PathLike = Union[str, os.PathLike]

DEFAULT_NAME = "coco_conversations"
DATA_FILE, REPORT_FILE = "data.json", "report.json"
#: COCO has no colour words, so "same color" is never asked; unrestricted instances are "objects".
COCO_RULES = ConversationRules(min_rounds=1, relations=tuple(r for r in REFERRING_RELATIONS if r != "same_color"),
                               default_noun="object")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class CocoOptions:
    """How conversations are made (``make-conversations``' options)."""

    rounds: int = 4  # at most, per conversation; each length in [1, rounds] is drawn
    per_image: int = 1  # conversations drawn per image (identical ones are dropped)
    seed: int = 0
    name: str = DEFAULT_NAME  # dataset name in the placeholders, the register and the file names
    min_target_fraction: float = 0.0025  # smaller instances only compete for uniqueness
    expression_share: float = 0.5  # how often round 1 uses a human-written expression when there is one

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.per_image < 1 or self.seed < 0:
            raise InputError(f"need rounds >= 1, per_image >= 1 and seed >= 0 (got {self.rounds}, "
                             f"{self.per_image}, {self.seed}).")
        if not _NAME.match(self.name):
            raise InputError(f"the dataset name {self.name!r} must be 1-64 letters, digits, '_', '-' or '.', "
                             "starting with a letter or digit.")
        if not 0.0 <= self.min_target_fraction < 1.0 or not 0.0 <= self.expression_share <= 1.0:
            raise InputError("min_target_fraction must be in [0, 1) and expression_share in [0, 1].")

    @property
    def rules(self) -> ConversationRules:
        return dataclasses.replace(COCO_RULES, expression_share=self.expression_share)


# ----------------------------------------------------------------------------------------------
# One image


@dataclasses.dataclass(frozen=True, eq=False)
class ImageResult:
    """What one image gives: conversation entries, the masks they name, and what was skipped."""

    image_id: Any
    file_name: Any
    entries: list[dict[str, Any]]
    masks: dict[str, np.ndarray]  # register id -> [H, W] bool
    problems: list[Problem]
    skipped: Problem | None = None  # set when the whole image was skipped
    too_small: int = 0  # usable instances below the target size (they only compete)
    layout: CocoLayout | None = None  # what the questions saw (tests re-check every round against it)
    conversations: tuple[Conversation, ...] = ()  # ``entries`` before formatting

    def report(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "file_name": self.file_name,
                "skipped": self.skipped.as_json() if self.skipped else None,
                "problems": [p.as_json() for p in self.problems]}


def image_conversations(coco: CocoFile, position: int, images_dir: Path, options: CocoOptions) -> ImageResult:
    """Conversations about image ``position`` of the file; never raises for bad data (it is reported)."""
    record = image_record(coco.images[position])
    if isinstance(record, Problem):
        raw = coco.images[position] if isinstance(coco.images[position], dict) else {}
        return ImageResult(raw.get("id"), raw.get("file_name"), [], {}, [], skipped=record)
    image_id, file_name, hw = record
    skipped = check_image_file(images_dir, file_name, hw) if image_id not in coco.duplicate_images else \
        Problem("duplicate_image_id", f"several image records have id {image_id}")
    if skipped is not None:
        return ImageResult(image_id, file_name, [], {}, [], skipped=skipped)
    min_area = options.min_target_fraction * hw[0] * hw[1]
    instances, problems, too_small = [], [], 0
    for ann in coco.annotations.get(image_id, []):
        instance, problem = locate_instance(ann, coco, hw, min_area)
        if instance is None:
            why = Problem("unlocatable_annotation", "an unusable annotation without a bbox could be any object "
                          "anywhere, so no question about this image is safe", problem.annotation_id)
            return ImageResult(image_id, file_name, [], {}, problems + [problem], skipped=why)
        instances.append(instance)
        if problem is not None:
            problems.append(problem)
        elif not instance.eligible:
            too_small += 1
    layout = CocoLayout(tuple(instances), hw)
    conversations = _conversations(layout, coco.expressions, position, options) if layout.eligible else []
    if not conversations:
        why = Problem("no_unique_referent", "no usable instance can be named uniquely (e.g. only two of a kind)") \
            if layout.eligible else Problem("no_instances", f"{len(instances)} annotations, none usable as a target")
        return ImageResult(image_id, file_name, [], {}, problems, skipped=why, too_small=too_small, layout=layout)
    mask_ids = [str(i.ann_id) for i in layout.instances]
    entries = [conversation_to_json(c, file_name, options.name, mask_ids, f"{options.name}_{image_id}_{k}")
               for k, c in enumerate(conversations)]
    named = sorted({r.target for c in conversations for r in c.rounds})  # references are earlier targets
    masks = {mask_ids[i]: layout.instances[i].full_mask(*hw) for i in named}
    return ImageResult(image_id, file_name, entries, masks, problems, too_small=too_small, layout=layout,
                       conversations=tuple(conversations))


def _conversations(layout: CocoLayout, expressions: Mapping[int, list[str]], position: int,
                   options: CocoOptions) -> list[Conversation]:
    """Up to ``options.per_image`` distinct, non-empty conversations about one image."""
    eligible = layout.eligible
    sentences = [(Query(EXPRESSION, expression=text), k) for k in eligible
                 for text in expressions.get(layout.instances[k].ann_id, [])]
    out, seen = [], set()
    for k in range(options.per_image):
        rng = np.random.default_rng([options.seed, position, k])
        conversation = generate_conversation(layout, rng, options.rounds, options.rules, eligible, sentences)
        key = tuple((r.query, r.target, r.ref_round) for r in conversation.rounds)
        if conversation.rounds and key not in seen:
            seen.add(key)
            out.append(conversation)
    return out


# ----------------------------------------------------------------------------------------------
# The whole file


@dataclasses.dataclass(frozen=True)
class ConversationFiles:
    """Where ``write_conversations`` put things."""

    out: Path
    conversations: Path
    register: Path
    data: Path
    report: Path
    summary: str  # the printed summary (counts of what was made and skipped)


def write_conversations(coco_path: PathLike, images_dir: PathLike, out: PathLike,
                        options: CocoOptions = CocoOptions(), *, progress: bool = True) -> ConversationFiles:
    """Reads ``coco_path``, makes conversations about the images under ``images_dir`` and writes them to
    the new folder ``out`` (atomically: a hidden sibling renamed when complete). Raises
    :class:`InputError` only when the file is unusable as a whole or no conversation could be made."""
    from tqdm.auto import tqdm

    images_dir, out = Path(images_dir).absolute(), Path(out).absolute()
    coco = read_coco(coco_path)
    entries, register, results = [], {}, []
    # a terminal sees the bar, then it clears itself: a pipe or a log gets no bar (an error stays one line)
    bar = tqdm(range(len(coco.images)), desc="conversations", unit="image", leave=False,
               disable=None if progress else True)
    for position in bar:
        result = image_conversations(coco, position, images_dir, options)
        entries += result.entries
        register.update({m: rle_encode_compressed(mask) for m, mask in result.masks.items()})
        results.append(dataclasses.replace(result, masks={}, layout=None))  # pixels are done with: memory stays flat
    report = _report(coco, results, options, coco_path, images_dir)
    summary = _summary(report, out)
    if not entries:
        raise InputError(f"no conversation could be made from {coco_path}: {_reasons(report)}; "
                         "check --images and the annotations.")
    files = ConversationFiles(out, out / "conversations" / f"{options.name}.json",
                              out / "annotations" / f"{options.name}.json", out / DATA_FILE, out / REPORT_FILE, summary)
    with written_atomically(out) as tmp:
        for folder in ("conversations", "annotations"):
            (tmp / folder).mkdir()
        rel = lambda p: tmp / p.relative_to(out)  # noqa: E731 - same layout, inside the temporary folder
        atomic_write_text(rel(files.conversations), json.dumps(entries, indent=1) + "\n")
        atomic_write_text(rel(files.register), register_text(register))
        data = {"conversations": [str(files.conversations)],
                "registers": [{"name": options.name, "path": str(files.register), "kind": "json"}],
                "images_root": str(images_dir)}
        atomic_write_text(rel(files.data), json.dumps(data, indent=1) + "\n")
        atomic_write_text(rel(files.report), json.dumps(report, indent=1) + "\n")
    return files


def _report(coco: CocoFile, results: Sequence[ImageResult], options: CocoOptions, coco_path: PathLike,
            images_dir: Path) -> dict[str, Any]:
    """Counts of what was made and skipped, and every image with a problem."""
    skipped = Counter(r.skipped.kind for r in results if r.skipped)
    bad_annotations = Counter(p.kind for r in results for p in r.problems)
    conversations = [c for r in results for c in r.conversations]
    rounds = [len(c.rounds) for c in conversations]
    # grouped as `eval` groups them: a referring round by its relation, a first round by its words
    types = Counter(question_type(r.question, None if r.ref_round is None else r.query.relation)
                    for c in conversations for r in c.rounds)
    return {
        "coco": str(Path(coco_path).absolute()), "images_dir": str(images_dir), "options": dataclasses.asdict(options),
        "images": {"total": len(results), "used": sum(1 for r in results if r.entries),
                   "skipped": sum(skipped.values())},
        "skipped_images": dict(sorted(skipped.items())),
        "annotations": {"total": sum(map(len, coco.annotations.values())) + coco.file_problems["orphan_annotation"],
                        "skipped": sum(bad_annotations.values()),
                        "too_small_to_name": sum(r.too_small for r in results)},
        "skipped_annotations": dict(sorted(bad_annotations.items())),
        "file_problems": dict(sorted(coco.file_problems.items())),
        "conversations": len(conversations), "rounds": sum(rounds),
        "conversations_by_rounds": {str(n): c for n, c in sorted(Counter(rounds).items())},
        "rounds_by_type": dict(sorted(types.items())),
        "per_image": [r.report() for r in results if r.skipped or r.problems],
    }


def _reasons(report: Mapping[str, Any]) -> str:
    parts = [f"{n} {IMAGE_PROBLEMS.get(k, k)}" for k, n in report["skipped_images"].items()]
    parts += [f"{n} {ANNOTATION_PROBLEMS.get(k, k)}" for k, n in report["skipped_annotations"].items()]
    return ", ".join(parts) or f"the file lists {report['images']['total']} images"


def _summary(report: Mapping[str, Any], out: Path) -> str:
    lines = [f"{report['conversations']} conversations ({report['rounds']} rounds) from "
             f"{report['images']['used']} of {report['images']['total']} images -> {out}"]
    for title, counts, words in (("skipped images", report["skipped_images"], IMAGE_PROBLEMS),
                                 ("skipped annotations", report["skipped_annotations"], ANNOTATION_PROBLEMS),
                                 ("file problems", report["file_problems"], FILE_PROBLEMS)):
        lines += [f"{title}:"] + [f"  {n:6d}  {words.get(k, k)} ({k})" for k, n in counts.items()] if counts else []
    small = report["annotations"]["too_small_to_name"]
    if small:
        lines.append(f"{small} instances below {report['options']['min_target_fraction']:g} of their image are never "
                     "named (they still count in every uniqueness test)")
    lines.append(f"per-image details: {out / REPORT_FILE}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading the output back


def mixture(out: PathLike, weight: float = 1.0) -> MixtureConfig:
    """The training ``MixtureConfig`` of a folder written by :func:`write_conversations` (paths from the
    folder itself, so it may have been moved; the images folder is the one recorded in ``data.json``)."""
    out = Path(out)
    if not (out / DATA_FILE).is_file():
        raise InputError(f"{out} is not a make-conversations folder (it has no {DATA_FILE}); write it with "
                         f"`segllm-jax make-conversations --out {out}`.")
    data = load_json(out / DATA_FILE)
    try:
        name = data["registers"][0]["name"]
        images_root = data["images_root"]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{out / DATA_FILE} is not a make-conversations data file; write the folder again.") from None
    return MixtureConfig(conversations=(ConversationFile(f"{name}.json", weight),),
                         registers=(RegisterSpec(name, f"{name}.json", kind="json"),),
                         images_root=images_root, annotations_root=str(out / "annotations"),
                         conversations_root=str(out / "conversations"))

