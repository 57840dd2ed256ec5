"""Learning recipe, stage 0c ("read, harder"): the reading LLM on the whole grounding mix (LLM only).

    segllm-jax train --config configs/tiny_mrshapes_reading_mix.py --workdir runs/tiny_mrshapes_recipe/reading_mix

The second half of the reading curriculum: the grounding conversations (attribute and superlative questions,
and referring questions about a ground-truth instance handed over through the [REF] memory), with the same
aids as ``configs/tiny_mrshapes_reading.py``, from that stage's ``model/`` folder. Stage 1 starts from here.
"""

import os

from segllm_jax.data.mrshapes_grounding import GROUNDING_FILE
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.config import mrshapes_reading_cpu

DATA = MRShapesData.recipe()
RUN = os.environ.get("SEGLLM_MRSHAPES_RUN", "runs/tiny_mrshapes_recipe")
CONFIG = mrshapes_reading_cpu(DATA.mixture(GROUNDING_FILE), DATA.tokenizer_dir, DATA.vocab_size, prepare_data=DATA,
                              init_checkpoint=f"{RUN}/reading/model",
                              steps=int(os.environ.get("SEGLLM_MRSHAPES_STEPS", "3000")))
