"""The mixture a training or evaluation run reads: conversation files, annotation registers and folders.

Plain data, apart from :mod:`segllm_jax.data.pipeline` (which imports grain and JAX), so configs and the
CLI's early checks can name a mixture without loading the input pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Union

from segllm_jax.data.registers import RegisterSpec, read_register_specs
from segllm_jax.errors import ConfigError

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class ConversationFile:
    path: str  # relative to MixtureConfig.conversations_root; with tfds_split, a TFDS dataset folder
    weight: float = 1.0  # the original used 1 for every file
    # Set: ``path`` is a prepared TFDS dataset (the folder holding dataset_info.json) and this split
    # of it is one file of the mixture; its records hold their images and masks (no register needed).
    tfds_split: str | None = None


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """What the original's conversation and annotation yaml files (plus folder flags) said."""

    conversations: tuple[ConversationFile, ...]
    registers: tuple[RegisterSpec, ...]
    images_root: str
    annotations_root: str
    conversations_root: str = "."
    limit_rounds: int | None = 6  # ``--limit_rounds 6`` of every released training script
    max_per_file: int | None = None  # the original's ``--load_data``: first k conversations per file
    is_eval: bool = False  # read ``<dataset>_eval`` registers where present

    @classmethod
    def from_yaml(cls, conversation_yaml: PathLike, annotation_yaml: PathLike, **folders: Any) -> MixtureConfig:
        """From the original's ``scripts/{conversation,annotation}_configs`` files; ``folders`` are the
        remaining fields (``images_root``, ``annotations_root``, ``conversations_root``, ...)."""
        import yaml  # a transformers dependency; only needed for the original's config files

        with open(conversation_yaml, encoding="utf-8") as f:
            entries = (yaml.safe_load(f) or {}).get("datasets")
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "name" in e for e in entries):
            raise ConfigError(f"{conversation_yaml} must hold 'datasets:' entries with a name.")
        files = tuple(ConversationFile(str(e["name"]), float(e.get("weight", 1.0)), e.get("tfds_split"))
                      for e in entries)
        return cls(conversations=files, registers=tuple(read_register_specs(annotation_yaml)), **folders)

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every conversation file (or TFDS dataset folder), under ``conversations_root``."""
        return tuple(Path(self.conversations_root) / c.path for c in self.conversations)
