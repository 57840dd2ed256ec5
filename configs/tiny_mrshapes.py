"""Learning recipe, stage 2 ("converse"): the tiny SegLLM on MR-Shapes multi-round conversations, from stage 1.

    bash configs/tiny_mrshapes_recipe.sh runs/tiny_mrshapes_recipe            # every stage, then the evaluation
    segllm-jax train --config configs/tiny_mrshapes.py --workdir runs/tiny_mrshapes_recipe/stage2
    segllm-jax eval --checkpoint runs/tiny_mrshapes_recipe/stage2/model --data mrshapes:$DATA:test --ablate-memory

Stage 2 starts from stage 1's exported model (``$SEGLLM_MRSHAPES_RUN/stage1/model``) through
``init_checkpoint``, the path users take from a converted release, and trains on the benchmark's
conversations (up to 6 rounds, each referring to earlier answers through the [REF] memory), every round's
prompt supervised and the reading aids still on. The shipped checkpoint ``checkpoints/tiny_mrshapes`` is this
run's ``model/`` folder; ``docs/learning_proof.md`` has the whole recipe and what each stage buys.
"""

import os

from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.config import READING_AIDS, mrshapes_cpu

DATA = MRShapesData.recipe()
RUN = os.environ.get("SEGLLM_MRSHAPES_RUN", "runs/tiny_mrshapes_recipe")
CONFIG = mrshapes_cpu(DATA.mixture(), DATA.tokenizer_dir, DATA.vocab_size, prepare_data=DATA,
                      init_checkpoint=f"{RUN}/stage1/model",
                      steps=int(os.environ.get("SEGLLM_MRSHAPES_STEPS", "1500")), batch_size=4, max_rounds=6,
                      hipie_prompts=16, **READING_AIDS)
