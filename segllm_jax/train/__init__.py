"""Training-side code of segllm-jax: HIPIE criterion (losses, matchers, denoising queries).

Spec: ``shared/spec/hipie-training.md``; the modules here follow its section numbers.
"""
