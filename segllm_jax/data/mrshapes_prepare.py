"""The learning recipe's data folder: MR-Shapes scenes, grounding conversations and a word-level tokenizer.

A training config *describes* the folder (:class:`MRShapesData`: where, how many scenes, which seed and
rounds, as ``TrainConfig.prepare_data``); the ``train`` command *writes* it before the model is built
(:meth:`MRShapesData.prepare`, idempotent), so importing a config generates nothing. The tokenizer's
vocabulary is the closed set of words MR-Shapes questions use (:func:`segllm_jax.data.mrshapes.vocabulary_text`
plus the template's words), whatever the scenes, so its size is known before the folder exists
(:attr:`MRShapesData.vocab_size`) and a config can size the model with it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

from segllm_jax.data.mixture import ConversationFile, MixtureConfig
from segllm_jax.data.registers import RegisterSpec
from segllm_jax.errors import ConfigError

TRAIN_CONVERSATIONS = "mrshapes_train.json"  # the benchmark's training conversations (and the train register)


def _template_text() -> str:
    """The words of the conversation template the LLM reads as text: the system prompt and the role names."""
    from segllm_jax.prompt import ASSISTANT_ROLE, SYSTEM_PROMPT, USER_ROLE

    return f"{SYSTEM_PROMPT} {USER_ROLE}: {ASSISTANT_ROLE}:"


@functools.cache
def _vocab_size() -> int:
    from segllm_jax.data import mrshapes
    from segllm_jax.data.tiny_tokenizer import word_vocabulary
    from segllm_jax.tokenizer import SEGLLM_ADDED_TOKENS

    return len(word_vocabulary([_template_text(), mrshapes.vocabulary_text()])) + len(SEGLLM_ADDED_TOKENS)


@dataclasses.dataclass(frozen=True)
class MRShapesData:
    """MR-Shapes prepared under ``root``: the ``train`` split (``n_scenes``), the grounding conversations on
    the same scenes and their attribute-only variant (``grounding_rounds`` each,
    :mod:`segllm_jax.data.mrshapes_grounding`)
    and, with ``eval_scenes > 0``, ``val`` and ``test`` splits of that size (same seed; a split is part of
    every scene's seed, so splits never share a scene), plus the word-level tokenizer."""

    root: str
    n_scenes: int = 8
    seed: int = 0
    max_rounds: int = 3
    eval_scenes: int = 0
    grounding_rounds: int = 6

    @classmethod
    def recipe(cls) -> "MRShapesData":
        """The learning recipe's folder (``configs/tiny_mrshapes*.py``): 2000 training scenes of seed 0 with up to
        6 rounds, 100 validation and 100 test scenes, under ``$SEGLLM_MRSHAPES_DATA`` (default
        ``~/.cache/segllm_jax/mrshapes``); ``$SEGLLM_MRSHAPES_SCENES`` changes the training scenes (smoke runs)."""
        import os

        root = os.environ.get("SEGLLM_MRSHAPES_DATA", str(Path.home() / ".cache" / "segllm_jax" / "mrshapes"))
        return cls(root, n_scenes=int(os.environ.get("SEGLLM_MRSHAPES_SCENES", "2000")), seed=0, max_rounds=6,
                   eval_scenes=100)

    @property
    def tokenizer_dir(self) -> str:
        return str(Path(self.root) / "tokenizer")

    @property
    def vocab_size(self) -> int:
        """Tokens of the prepared tokenizer, SegLLM's added tokens included (the model's ``vocab_size``)."""
        return _vocab_size()

    def mixture(self, conversations: str = TRAIN_CONVERSATIONS) -> MixtureConfig:
        """A mixture of one conversation file of the folder (train images and register)."""
        out = Path(self.root)
        return MixtureConfig(conversations=(ConversationFile(conversations),),
                             registers=(RegisterSpec("mrshapes", TRAIN_CONVERSATIONS),),
                             images_root=str(out / "images"), annotations_root=str(out / "annotations"),
                             conversations_root=str(out / "conversations"))

    def prepare(self) -> int:
        """Writes the folder unless it is ready; returns the tokenizer's vocabulary size.

        The tokenizer is trained on the text the LLM reads as text: the system prompt, the role names and
        the questions (no placeholder payloads). A folder prepared with other arguments is refused, not mixed.
        """
        from segllm_jax.data import mrshapes
        from segllm_jax.data.conversations import parse_placeholders
        from segllm_jax.data.mrshapes_grounding import write_grounding
        from segllm_jax.data.tiny_tokenizer import train_tokenizer
        from segllm_jax.tokenizer import SegTokenizer

        out = Path(self.root)
        done = out / "READY.json"
        request = {"n_scenes": self.n_scenes, "seed": self.seed, "max_rounds": self.max_rounds,
                   "eval_scenes": self.eval_scenes, "grounding_rounds": self.grounding_rounds,
                   "tokenizer": "word-level", "attribute_conversations": True}
        if not done.exists():
            logging.getLogger(__name__).info(
                "writing MR-Shapes to %s: %d training scenes, their grounding conversations, %d val / test scenes "
                "and the tokenizer (about a minute per 700 scenes)", out, self.n_scenes, self.eval_scenes)
            files = [mrshapes.write_split(out, "train", self.n_scenes, self.seed,
                                          max_rounds=self.max_rounds).conversations,
                     write_grounding(out, self.n_scenes, self.seed, self.grounding_rounds),
                     write_grounding(out, self.n_scenes, self.seed, self.grounding_rounds, attribute_only=True)]
            if self.eval_scenes:
                for split in ("val", "test"):
                    mrshapes.write_split(out, split, self.eval_scenes, self.seed, max_rounds=self.max_rounds)
            texts = [_template_text(), mrshapes.vocabulary_text()]
            for path in files:
                for entry in mrshapes.read_conversations(path):
                    texts += [parse_placeholders(turn["value"])[1] for turn in entry["conversations"]]
            train_tokenizer(texts, self.tokenizer_dir)
            vocab = SegTokenizer.from_pretrained(self.tokenizer_dir).vocab_size
            done.write_text(json.dumps({**request, "vocab": vocab}))
        ready = json.loads(done.read_text())
        made = {k: ready.get(k) for k in request}
        if made != request:
            raise ConfigError(f"{out} holds MR-Shapes prepared with {made}, not {request}; "
                              "remove the folder or choose another one.")
        if ready["vocab"] != self.vocab_size:
            raise ConfigError(f"{out}'s tokenizer has {ready['vocab']} tokens, not the {self.vocab_size} of "
                              "MR-Shapes' vocabulary: its questions use a word mrshapes.vocabulary_text() lacks, "
                              "or another version prepared the folder (remove it).")
        return ready["vocab"]


def prepare_tiny_mrshapes(root: str | Path, n_scenes: int = 8, seed: int = 0, max_rounds: int = 3,
                          eval_scenes: int = 0, grounding_rounds: int = 6) -> tuple[MixtureConfig, str, int]:
    """Prepares :class:`MRShapesData` (idempotent) and returns ``(mixture, tokenizer_dir, vocab_size)``
    for the benchmark's training conversations (``MRShapesData.mixture(GROUNDING_FILE)`` gives stage 1's)."""
    data = MRShapesData(str(root), n_scenes, seed, max_rounds, eval_scenes, grounding_rounds)
    return data.mixture(), data.tokenizer_dir, data.prepare()
