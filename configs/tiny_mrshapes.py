"""The learning proof: the tiny SegLLM trained from scratch on MR-Shapes on a 2-core CPU.

    segllm-jax train --config configs/tiny_mrshapes.py --workdir runs/tiny_mrshapes
    segllm-jax eval --checkpoint runs/tiny_mrshapes/model --data mrshapes:$DATA:test --ablate-memory

The data (2000 training scenes, 100 validation and 100 test scenes of up to 6 rounds, seed 0, and a
tokenizer trained on the training questions) is generated on first use under ``$SEGLLM_MRSHAPES_DATA``
(default ``~/.cache/segllm_jax/mrshapes``). ``SEGLLM_MRSHAPES_STEPS`` and ``SEGLLM_MRSHAPES_SCENES``
override the step count and the training scenes (the CI run uses a few of each). The shipped checkpoint ``checkpoints/tiny_mrshapes`` is this run's ``model/`` folder.
"""

import os
from pathlib import Path

from segllm_jax.train.config import mrshapes_cpu, prepare_tiny_mrshapes

DATA = os.environ.get("SEGLLM_MRSHAPES_DATA", str(Path.home() / ".cache" / "segllm_jax" / "mrshapes"))
_scenes = int(os.environ.get("SEGLLM_MRSHAPES_SCENES", "2000"))
_mixture, _tokenizer_dir, _vocab = prepare_tiny_mrshapes(DATA, n_scenes=_scenes, seed=0, max_rounds=6,
                                                         eval_scenes=100)

CONFIG = mrshapes_cpu(_mixture, _tokenizer_dir, _vocab,
                      **({"steps": int(os.environ["SEGLLM_MRSHAPES_STEPS"])}
                         if "SEGLLM_MRSHAPES_STEPS" in os.environ else {}))
