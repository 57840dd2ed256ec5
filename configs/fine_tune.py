"""Fine-tune a converted SegLLM on conversations made from your own COCO annotations (docs/fine_tuning.md).

    segllm-jax make-conversations --coco train.json --images images/ --out conversations/train
    SEGLLM_INIT=converted/ SEGLLM_DATA=conversations/train \\
        segllm-jax train --config configs/fine_tune.py --workdir runs/fine_tune

``SEGLLM_INIT``: the segllm-jax checkpoint folder to start from (``segllm-jax convert RELEASE DST``, or the
``model/`` of an earlier run); its ``config.json`` is the model and its tokenizer the run's.
``SEGLLM_DATA``: a ``make-conversations`` output folder. ``SEGLLM_PRESET`` picks the hardware:

* ``gpu`` (default): one GPU. SegLLM-7B's float32 training state (weights, gradients, AdamW moments)
  is 100.4 GiB on one device (``benchmarks/memory_table.py``'s arithmetic, ``docs/memory.md``), so
  this needs a 141 GB card (H200, B200); on 80 GB cards use ``pod`` over 8 GPUs.
* ``pod``: every device of the job (a TPU pod slice, or 8 GPUs on one or more hosts) in one FSDP
  mesh; run the same command on every host (``docs/training.md``, "Multi-host").
* ``cpu``: the seconds-long check the tests run on the tiny release fixture.

``SEGLLM_STEPS`` and ``SEGLLM_BATCH`` override the preset's step count and global batch.
"""

import os

from segllm_jax.checkpoint import read_config
from segllm_jax.data.coco_conversations import mixture
from segllm_jax.errors import ConfigError
from segllm_jax.train.config import LoraConfig, TrainConfig

INIT = os.environ.get("SEGLLM_INIT", "converted")
DATA = os.environ.get("SEGLLM_DATA", "conversations/train")
PRESET = os.environ.get("SEGLLM_PRESET", "gpu")

# The released recipe's optimiser (TrainConfig defaults: AdamW lr 2e-6, cosine, 3 % warm-up, bf16 compute,
# full remat, architecture.md §T12 freezing); the presets set only what the hardware decides.
PRESETS = {
    "gpu": dict(batch_size=4, steps=2000, mesh_shape=(1, 1, 1), checkpoint_every=250),
    "pod": dict(batch_size=32, steps=1000, mesh_shape=(1, -1, 1), checkpoint_every=250),
    # LoRA / QLoRA on one card (docs/fine_tuning.md, "LoRA / QLoRA"): adapters on the LLM's projections,
    # the <seg> predictor and mask-encode head fully trained, everything else frozen
    "lora": dict(batch_size=4, steps=2000, mesh_shape=(1, 1, 1), checkpoint_every=250, learning_rate=2e-4,
                 lora=LoraConfig()),
    "qlora": dict(batch_size=4, steps=2000, mesh_shape=(1, 1, 1), checkpoint_every=250, learning_rate=2e-4,
                  lora=LoraConfig(), base_weights_qtype="nf4"),
    "cpu": dict(batch_size=2, steps=1, mesh_shape=(1, 1, 1), checkpoint_every=1, compute_dtype="float32",
                remat="none", pad_multiple=128, use_hipie_loss=False, learning_rate=1e-4, warmup_ratio=0.0,
                tensorboard=False),
}
if PRESET not in PRESETS:
    raise ConfigError(f"SEGLLM_PRESET={PRESET!r}; use one of {', '.join(PRESETS)}.")
_preset = dict(PRESETS[PRESET])
_preset["steps"] = int(os.environ.get("SEGLLM_STEPS", _preset["steps"]))
_preset["batch_size"] = int(os.environ.get("SEGLLM_BATCH", _preset["batch_size"]))

_kind, _model = read_config(INIT)
if _kind != "segllm":
    raise ConfigError(f"SEGLLM_INIT={INIT} holds a {_kind} checkpoint; fine-tuning starts from a whole SegLLM.")

CONFIG = TrainConfig(model=_model, data=mixture(DATA), tokenizer_dir=INIT, init_checkpoint=INIT, **_preset)
