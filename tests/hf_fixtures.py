"""Tiny `transformers` PyTorch models with the real key names, saved in HF layout.

Tests build their own checkpoints (no hub access): random weights, real architectures, the same
save_pretrained files a released checkpoint has (sharded safetensors with an index when asked).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def tiny_llama_hf(vocab_size: int = 96, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF init leaves norms at exactly 1: perturb so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_clip_vision_hf(seed: int = 0) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
        patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5, attn_implementation="eager")
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, directory: Path, shard_size: str | None = None) -> Path:
    """``save_pretrained`` as safetensors; ``shard_size`` (e.g. '20KB') forces shards + index."""
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory
