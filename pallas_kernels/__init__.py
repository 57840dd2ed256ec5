"""Hand-written Pallas kernels for segllm-jax (importing this package loads no Pallas code)."""

from pallas_kernels.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
