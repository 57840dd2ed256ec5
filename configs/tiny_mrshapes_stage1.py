"""Learning recipe, stage 1 ("ground"): HIPIE learns to segment what the reading LLM's prompt names.

    segllm-jax train --config configs/tiny_mrshapes_stage1.py --workdir runs/tiny_mrshapes_recipe/stage1
    segllm-jax train --config configs/tiny_mrshapes.py --workdir runs/tiny_mrshapes_recipe/stage2   # stage 2

The released SegLLM starts from a HIPIE already grounded on referring expressions by a text encoder; ours is
grounded here, on the grounding conversations of the training scenes (``segllm_jax.data.mrshapes_grounding``:
six independent questions per image, so different targets in one image are the contrastive signal; attribute
and superlative questions, and referring questions about a ground-truth instance handed over as [REF] inputs),
every round's prompt supervised. HIPIE, the ``<seg>`` predictor and the DN label encoder start from random
weights; the LLM (and CLIP) from the reading stages (``$SEGLLM_MRSHAPES_RUN/reading_mix/model``): its tiny LLaMA
plays the text encoder HIPIE had in BERT, and its prompts already say where the target is. Everything trains,
with the reading aids still on (``READING_AIDS``) so that a random HIPIE's early gradient does not undo the
reading. (Freezing the LLM here, ``train_only=HIPIE_PARAMS``, was measured too: the same round-1 cIoU, 1-10
points less at the referring rounds and no memory gap; ``docs/learning_proof.md``.) Stage 2 starts from this
stage's ``model/`` folder.
"""

import os

from segllm_jax.data.mrshapes_grounding import GROUNDING_FILE
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.config import READING_AIDS, mrshapes_cpu

DATA = MRShapesData.recipe()
RUN = os.environ.get("SEGLLM_MRSHAPES_RUN", "runs/tiny_mrshapes_recipe")
CONFIG = mrshapes_cpu(DATA.mixture(GROUNDING_FILE), DATA.tokenizer_dir, DATA.vocab_size, prepare_data=DATA,
                      init_checkpoint=f"{RUN}/reading_mix/model",
                      steps=int(os.environ.get("SEGLLM_MRSHAPES_STEPS", "1500")), batch_size=4, max_rounds=6,
                      hipie_prompts=24, **READING_AIDS)
