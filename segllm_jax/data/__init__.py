"""Data: conversation JSON, annotation registers, input pipelines and the MR-Shapes generator.

``mrshapes`` procedurally generates a small multi-round referring-segmentation benchmark in the
released SegLLM conversation-JSON format, so the whole pipeline can be trained and evaluated
without downloading COCO/RefCOCO.
"""
