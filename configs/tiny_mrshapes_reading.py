"""Learning recipe, stage 0b ("read"): the tiny LLM taught to find a named shape in its image (LLM only).

    segllm-jax train --config configs/tiny_mrshapes_reading.py --workdir runs/tiny_mrshapes_recipe/reading

SegLLM's LLM arrives reading images (LLaVA's pretraining); the toy's does not, and left alone it answers from
the question's words. This stage trains the LLM (HIPIE's loss off, so a step costs a fraction of one with HIPIE)
on attribute questions only ("Find the red circle.", ``mrshapes_grounding.ATTRIBUTE_FILE``) with the two
reading aids of ``segllm_jax.train.aids``: a box head saying where each prompt's target is (weight 10: lighter,
the prompt does not carry what the attention finds) and a cross-entropy putting one attention head on the
target's CLIP patches. It starts from the CLIP stage (``$SEGLLM_MRSHAPES_RUN/clip/model``); the next stage,
``configs/tiny_mrshapes_reading_mix.py``, goes on with superlatives and relations (a curriculum).
"""

import os

from segllm_jax.data.mrshapes_grounding import ATTRIBUTE_FILE
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.config import mrshapes_reading_cpu

DATA = MRShapesData.recipe()
RUN = os.environ.get("SEGLLM_MRSHAPES_RUN", "runs/tiny_mrshapes_recipe")
CONFIG = mrshapes_reading_cpu(DATA.mixture(ATTRIBUTE_FILE), DATA.tokenizer_dir, DATA.vocab_size, prepare_data=DATA,
                              init_checkpoint=f"{RUN}/clip/model",
                              steps=int(os.environ.get("SEGLLM_MRSHAPES_STEPS", "8000")))
