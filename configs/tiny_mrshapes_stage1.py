"""Learning recipe, stage 1 of 2: ground referring questions on MR-Shapes (the analogue of HIPIE's pretraining).

    segllm-jax train --config configs/tiny_mrshapes_stage1.py --workdir runs/tiny_mrshapes_stage1
    segllm-jax train --config configs/tiny_mrshapes.py --workdir runs/tiny_mrshapes      # stage 2

The released SegLLM starts from a HIPIE already grounded on text and an LLM that already reads; ours
starts from random weights, so stage 1 teaches grounding on its own: the whole tiny SegLLM (its LLaMA
plays the text encoder HIPIE had in BERT) on the grounding conversations of the training scenes
(``segllm_jax.data.mrshapes_grounding``: six independent questions per image, attribute and superlative
questions and referring questions about a ground-truth instance handed over as [REF] inputs), with
every round's prompt supervised. Stage 2 starts from this stage's ``model/`` folder.

The data (2000 training scenes, 100 validation and 100 test scenes, seed 0, and the word-level tokenizer)
is written by the ``train`` command on first use under ``$SEGLLM_MRSHAPES_DATA`` (default
``~/.cache/segllm_jax/mrshapes``); ``SEGLLM_MRSHAPES_STEPS`` and ``SEGLLM_MRSHAPES_SCENES`` override the step
count and the training scenes.
"""

import os
from pathlib import Path

from segllm_jax.data.mrshapes_grounding import GROUNDING_FILE
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.config import mrshapes_cpu

DATA = MRShapesData(os.environ.get("SEGLLM_MRSHAPES_DATA", str(Path.home() / ".cache" / "segllm_jax" / "mrshapes")),
                    n_scenes=int(os.environ.get("SEGLLM_MRSHAPES_SCENES", "2000")), seed=0, max_rounds=6,
                    eval_scenes=100)

CONFIG = mrshapes_cpu(DATA.mixture(GROUNDING_FILE), DATA.tokenizer_dir, DATA.vocab_size, prepare_data=DATA,
                      steps=int(os.environ.get("SEGLLM_MRSHAPES_STEPS", "1500")), batch_size=4, max_rounds=6,
                      hipie_prompts=24)
