"""Learning recipe, stage 2 with LoRA: the same run as ``configs/tiny_mrshapes.py`` (same start, data, steps and
batch), the LLM trained through LoRA adapters instead of in full.

    segllm-jax train --config configs/tiny_mrshapes_lora.py --workdir runs/tiny_mrshapes_recipe/stage2_lora
    segllm-jax merge-lora --checkpoint runs/tiny_mrshapes_recipe/stage2_lora --out runs/tiny_mrshapes_recipe/lora_merged

The comparison of ``docs/memory.md`` ("LoRA against full fine-tuning"): LoRA on the LLM's attention and MLP
projections (``LoraConfig``'s defaults), and in full what SegLLM's LoRA recipes train in full, the mask side
(HIPIE, the ``<seg>`` predictor, the mask-encode head) and the projector; the CLIP tower, the LLM's embeddings
and its head stay at stage 1's values.
"""

import runpy
from pathlib import Path

from segllm_jax.train.config import HIPIE_PARAMS, LoraConfig

FULL = runpy.run_path(str(Path(__file__).with_name("tiny_mrshapes.py")))["CONFIG"]
CONFIG = FULL.replace(lora=LoraConfig(train=(*HIPIE_PARAMS, r"^mask_enc_head/", r"^mm_projector/")))
