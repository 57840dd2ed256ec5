"""HIPIE segmentor (SegLLM's mask decoder) in Flax NNX; see docs/architecture.md §H1 to §H15."""
