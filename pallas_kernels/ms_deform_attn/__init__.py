"""Multi-scale deformable attention: pure-JAX reference and Pallas GPU/TPU kernels."""

from pallas_kernels.ms_deform_attn.api import IMPLS, ms_deform_attn
from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_xla

__all__ = ["IMPLS", "ms_deform_attn", "ms_deform_attn_xla"]
