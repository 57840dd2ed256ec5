"""Hand-written Pallas kernels for segllm-jax (importing this package loads no Pallas code).

Top-level, not ``segllm_jax.kernels``, on purpose: the design card fixes this layout, and the kernels are
standalone. They import nothing of ``segllm_jax`` (a contract in pyproject.toml, ``make lint``), so they
can be tested, benchmarked and reused on their own; ``segllm_jax.models`` imports them, never the reverse.
"""

from pallas_kernels.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
