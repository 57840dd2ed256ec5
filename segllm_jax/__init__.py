"""segllm-jax: SegLLM (multi-round reasoning segmentation) in JAX/Flax NNX."""

__version__ = "0.1.0"
