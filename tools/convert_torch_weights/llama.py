"""Mapping table: transformers ``LlamaForCausalLM`` -> :class:`segllm_jax.models.llama.Llama`."""

from __future__ import annotations

from segllm_jax.config import LlamaConfig
from segllm_jax_convert.engine import MappingTable, Rule, linear_kernel

_L = r"model\.layers\.(?P<i>\d+)\."


def llama_table(cfg: LlamaConfig) -> MappingTable:
    rules = [
        Rule(r"model\.embed_tokens\.weight", "embed_tokens/embedding"),
        Rule(r"model\.norm\.weight", "norm/scale"),
        Rule(_L + r"input_layernorm\.weight", "layers/{i}/input_layernorm/scale"),
        Rule(_L + r"post_attention_layernorm\.weight", "layers/{i}/post_attention_layernorm/scale"),
        *(Rule(_L + rf"self_attn\.{p}\.weight", f"layers/{{i}}/self_attn/{p}/kernel", linear_kernel)
          for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *(Rule(_L + rf"mlp\.{p}\.weight", f"layers/{{i}}/mlp/{p}/kernel", linear_kernel)
          for p in ("gate_proj", "up_proj", "down_proj")),
    ]
    ignore = [(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE tables are recomputed")]
    if cfg.tie_word_embeddings:
        ignore.append((r"lm_head\.weight", "tied to embed_tokens"))
    else:
        rules.append(Rule(r"lm_head\.weight", "lm_head/kernel", linear_kernel))
    return MappingTable("llama", tuple(rules), tuple(ignore))
