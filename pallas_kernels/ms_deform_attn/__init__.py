"""Multi-scale deformable attention: pure-JAX (blocked and dense reference) and Pallas GPU/TPU kernels."""

from pallas_kernels.ms_deform_attn.api import IMPLS, ms_deform_attn
from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_dense
from pallas_kernels.ms_deform_attn.xla import ms_deform_attn_xla

__all__ = ["IMPLS", "ms_deform_attn", "ms_deform_attn_dense", "ms_deform_attn_xla"]
