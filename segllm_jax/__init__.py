"""segllm-jax: SegLLM (multi-round reasoning segmentation) in JAX/Flax NNX.

``segllm_jax.load(DIR)`` loads a converted checkpoint; ``MultiRoundSession(loaded, image)`` chats
about one image. Both are imported lazily so ``import segllm_jax`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["load", "MultiRoundSession"]


def __getattr__(name: str):
    if name == "load":
        from segllm_jax.checkpoint import load

        return load
    if name == "MultiRoundSession":
        from segllm_jax.session import MultiRoundSession

        return MultiRoundSession
    raise AttributeError(f"module 'segllm_jax' has no attribute {name!r}")
