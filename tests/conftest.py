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


# The files that take minutes (mostly compiling the HIPIE training step), longest first. `make test` runs
# whole files on 2 xdist workers (--dist loadfile), handed out in collection order: starting these first keeps
# one worker from running a long file alone at the end. Measured with `make test`'s --durations list.
SLOW_FILES_FIRST = (
    "learning/test_mrshapes_training.py",
    "benchmarks/test_gpu_suite_smoke.py",
    "train/test_lora.py",
    "train/test_loop.py",
    "train/test_multihost.py",
    "train/test_step.py",
    "train/test_hipie_training_golden.py",
    "hipie/test_hipie_golden.py",
    "train/test_metrics_logging.py",
    "segllm/test_segllm_golden.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), tests_dir), len(rank)))  # stable
