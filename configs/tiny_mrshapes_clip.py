"""Learning recipe, stage 0a ("see"): the tiny CLIP tower pretrained per patch on MR-Shapes (colour, kind, place).

    segllm-jax train --config configs/tiny_mrshapes_clip.py --workdir runs/tiny_mrshapes_recipe/clip

The toy's stand-in for OpenAI's CLIP (``segllm_jax.train.clip_pretrain``): linear heads on every patch feature
the LLM reads learn the colour and kind of the shape under the patch (or background) and the patch's row and
column, on the training scenes. Its ``model/`` folder (the pretrained tower, the rest at random init) starts the
reading stages (``configs/tiny_mrshapes_reading.py``). ``bash configs/tiny_mrshapes_recipe.sh`` runs every stage;
``docs/learning_proof.md`` has the recipe and what each stage buys. The data folder is
``segllm_jax.data.mrshapes_prepare.MRShapesData.recipe()`` (written on first use); ``$SEGLLM_MRSHAPES_STEPS``
overrides the step count.
"""

import os

from segllm_jax.config import SegLLMConfig
from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.clip_pretrain import ClipPretrainConfig

DATA = MRShapesData.recipe()
CONFIG = ClipPretrainConfig(model=SegLLMConfig.tiny_mrshapes(DATA.vocab_size), data=DATA,
                            steps=int(os.environ.get("SEGLLM_MRSHAPES_STEPS", "3000")), batch_size=32)
