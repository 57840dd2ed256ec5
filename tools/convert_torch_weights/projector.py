"""Mapping table: LLaVA ``nn.Sequential(Linear, GELU, Linear)`` -> :class:`MlpProjector`."""

from __future__ import annotations

from segllm_jax_convert.engine import MappingTable, Rule, linear_kernel


def mlp_projector_table(name: str = "mlp2x_gelu") -> MappingTable:
    """Keys ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias`` (index 1 is the GELU)."""
    return MappingTable(name, (
        Rule(r"0\.weight", "linear_1/kernel", linear_kernel),
        Rule(r"0\.bias", "linear_1/bias"),
        Rule(r"2\.weight", "linear_2/kernel", linear_kernel),
        Rule(r"2\.bias", "linear_2/bias"),
    ))
