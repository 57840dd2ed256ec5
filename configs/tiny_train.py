"""Tiny SegLLM trained on MR-Shapes on a CPU: ``segllm-jax train --config configs/tiny_train.py --workdir DIR``.

The data (MR-Shapes scenes + a small tokenizer) is written by the ``train`` command on first use under
``$SEGLLM_TINY_DATA`` (default ``~/.cache/segllm_jax/tiny_train``). ``SEGLLM_TINY_STEPS`` and
``SEGLLM_TINY_EVERY`` override the step count and checkpoint interval, ``SEGLLM_TINY_BATCH`` the global
batch and ``SEGLLM_TINY_MESH`` (e.g. ``1,-1,1``) the mesh; ``SEGLLM_TINY_LORA`` (a ``base_weights_qtype``: none,
bf16, int8, nf4) trains rank-4 LoRA adapters with dropout 0.1 on that base instead of the model (the resume and
multi-process tests use them).
"""

import os
from pathlib import Path

from segllm_jax.data.mrshapes_prepare import MRShapesData
from segllm_jax.train.config import LoraConfig, tiny_cpu

DATA = MRShapesData(os.environ.get("SEGLLM_TINY_DATA", str(Path.home() / ".cache" / "segllm_jax" / "tiny_train")),
                    n_scenes=8, seed=0)

CONFIG = tiny_cpu(DATA.mixture(), DATA.tokenizer_dir, DATA.vocab_size, prepare_data=DATA,
                  steps=int(os.environ.get("SEGLLM_TINY_STEPS", "8")),
                  checkpoint_every=int(os.environ.get("SEGLLM_TINY_EVERY", "4")),
                  batch_size=int(os.environ.get("SEGLLM_TINY_BATCH", "2")),
                  mesh_shape=tuple(int(x) for x in os.environ.get("SEGLLM_TINY_MESH", "1,1,1").split(",")),
                  async_checkpointing=True)
if os.environ.get("SEGLLM_TINY_LORA"):
    CONFIG = CONFIG.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1),
                            base_weights_qtype=os.environ["SEGLLM_TINY_LORA"])
