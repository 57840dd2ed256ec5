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


# The files that take minutes (mostly compiling the HIPIE training step), longest first (seconds of the
# file's tests in `make test`'s --durations list, 2026-12-07). `make test` runs whole files on 2 xdist
# workers (--dist loadfile) handed out in collection order; it passes --no-loadscope-reorder, since xdist
# otherwise sorts files by their number of tests, which sent the one-test, two-minute files last and left
# one worker running them alone for minutes.
SLOW_FILES_FIRST = (
    "train/test_loop.py",  # ~330 s: SIGKILL-resume of full and LoRA training, NaN stop
    "learning/test_mrshapes_training.py",  # ~290 s
    "train/test_lora.py",  # ~240 s
    "train/test_step.py",  # ~220 s
    "train/test_hipie_training_golden.py",  # ~150 s
    "benchmarks/test_gpu_suite_smoke.py",  # ~140 s
    "train/test_multihost.py",  # ~125 s
    "train/test_metrics_logging.py",  # ~100 s
    "segllm/test_segllm_golden.py",
    "hipie/test_hipie_golden.py",
    "web/test_web_demo_bad_input.py",
    "segllm/test_quantize.py",
    "learning/test_shipped_checkpoint.py",
    "segllm/test_fine_tuning_doc.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), tests_dir), len(rank)))  # stable
