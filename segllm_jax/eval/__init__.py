"""Evaluation: SegLLM's per-round segmentation metrics (gIoU, cIoU, P@0.5) and evaluation loops."""
