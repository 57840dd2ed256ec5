"""Suite-wide set-up: 8 fake CPU devices (sharding tests) and float32-exact matmuls on CPU."""

import os

# Must happen before JAX initialises its backend: sharding tests need a 2x2x2 mesh of CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(root, loaded): a tiny SegLLM release folder, converted and loaded (see tests/segllm/conftest.py)."""
    from segllm.conftest import build_tiny

    return build_tiny(tmp_path_factory)
