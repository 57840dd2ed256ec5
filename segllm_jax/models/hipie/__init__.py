"""HIPIE segmentor (SegLLM's mask decoder) in Flax NNX; see shared/spec/hipie-segmentor.md."""
