"""Training: HIPIE criterion (losses, matchers, denoising queries), HIPIE loss, train step, loop, checkpoints.

Spec: ``shared/spec/hipie-training.md`` (criterion modules follow its section numbers) and
``shared/spec/segllm-model.md`` §5. ``config.py`` (TrainConfig), ``state.py``, ``step.py`` (pure,
jit-able step), ``checkpointing.py`` (orbax, exact resume), ``loop.py`` (``segllm-jax train``).
"""
