"""Training: HIPIE criterion (losses, matchers, denoising queries), HIPIE loss, train step, loop, checkpoints.

Described in ``docs/architecture.md`` §T1 to §T14 (criterion modules follow its sections).
``config.py`` (TrainConfig), ``state.py``, ``batching.py`` (examples -> ``TrainBatch`` on the mesh),
``step.py`` (pure, jit-able step), ``checkpointing.py``
(orbax, exact resume), ``loop.py`` (``segllm-jax train``).
"""
