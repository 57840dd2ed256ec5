"""Learning recipe, stage 2 of 2: the tiny SegLLM on MR-Shapes multi-round conversations, from stage 1.

    segllm-jax train --config configs/tiny_mrshapes_stage1.py --workdir runs/tiny_mrshapes_stage1
    segllm-jax train --config configs/tiny_mrshapes.py --workdir runs/tiny_mrshapes
    segllm-jax eval --checkpoint runs/tiny_mrshapes/model --data mrshapes:$DATA:test --ablate-memory

Stage 2 starts from stage 1's exported model (``$SEGLLM_MRSHAPES_STAGE1``, default
``runs/tiny_mrshapes_stage1/model``) through ``init_checkpoint``, the path users take from a converted
release, and trains on the benchmark's conversations (up to 6 rounds, each referring to earlier answers
through the [REF] memory), every round's prompt supervised. Same data folder and variables as stage 1
(``docs/learning_proof.md`` has the whole recipe and what each part buys). The shipped checkpoint
``checkpoints/tiny_mrshapes`` is this run's ``model/`` folder.
"""

import os
from pathlib import Path

from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.config import mrshapes_cpu

DATA = MRShapesData(os.environ.get("SEGLLM_MRSHAPES_DATA", str(Path.home() / ".cache" / "segllm_jax" / "mrshapes")),
                    n_scenes=int(os.environ.get("SEGLLM_MRSHAPES_SCENES", "2000")), seed=0, max_rounds=6,
                    eval_scenes=100)
STAGE1 = os.environ.get("SEGLLM_MRSHAPES_STAGE1", "runs/tiny_mrshapes_stage1/model")

CONFIG = mrshapes_cpu(DATA.mixture(), DATA.tokenizer_dir, DATA.vocab_size, prepare_data=DATA,
                      init_checkpoint=STAGE1 or None,
                      steps=int(os.environ.get("SEGLLM_MRSHAPES_STEPS", "1500")), batch_size=4, max_rounds=6,
                      hipie_prompts=16)
