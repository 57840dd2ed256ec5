"""Suite-wide set-up: 8 fake CPU devices (sharding tests) and float32-exact matmuls on CPU."""

import os

# Must happen before JAX initialises its backend: sharding tests need a 2x2x2 mesh of CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# JAX's persistent compilation cache, shared by both xdist workers and every process the tests start: the
# training CLIs that the resume, multi-host and learning tests run one after another compile the same random
# init and train step (about 11 s and 4 s each for tiny_train), which later processes now load. A cache entry is
# keyed by the program, the compile options and the jax/XLA versions, so it cannot change a result; the size cap
# also makes JAX lock the folder, so concurrent processes never read a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
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


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# The files that take minutes (mostly compiling the HIPIE training step), longest first (seconds of the
# file's tests in `make test`'s --durations list, 2026-12-07). `make test` runs whole files on 2 xdist
# workers (--dist loadfile) handed out in collection order; it passes --no-loadscope-reorder, since xdist
# otherwise sorts files by their number of tests, which sent the one-test, two-minute files last and left
# one worker running them alone for minutes.
SLOW_FILES_FIRST = (
    "train/test_loop.py",  # ~330 s: SIGKILL-resume of full and LoRA training, NaN stop
    "learning/test_mrshapes_training.py",  # ~250 s (every recipe stage through the CLI)
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


# Files whose time goes to compiling many small programs (most of them in subprocesses they start), not to
# running them: XLA's optimisation passes cost them more than they save. Their tests compile with
# jax_disable_most_optimizations, which the subprocesses inherit through the environment. What they compare
# (a run against its resumed twin, one process against two, a loss before and after) is compiled the same
# way on both sides; the golden and parity tests keep the default compiler. Measured on this 2-core machine,
# one file at a time while a training job ran beside, default -> fewer passes, in seconds (2026-12-07):
# test_loop 217 -> 182, test_step 161 -> 111, test_multihost 141 -> 122, the GPU-suite smoke 127 -> 87, the
# learning smoke 217 -> 202, test_metrics_logging 76 -> 53, test_aids 57 -> 43, one LoRA variant 41 -> 28; on an
# idle machine (2026-12-08): the fine-tuning walk-through 51 -> 43, the web demo's bad-input file 84 -> 79.
COMPILE_BOUND_FILES = frozenset({
    "train/test_loop.py",
    "train/test_step.py",
    "train/test_multihost.py",
    "train/test_lora.py",
    "train/test_metrics_logging.py",
    "train/test_aids.py",
    "benchmarks/test_gpu_suite_smoke.py",
    "learning/test_mrshapes_training.py",
    "segllm/test_fine_tuning_doc.py",
    "web/test_web_demo_bad_input.py",
})


@pytest.fixture(scope="module", autouse=True)
def _fewer_compiler_passes(request):
    if os.path.relpath(str(request.path), TESTS_DIR) not in COMPILE_BOUND_FILES:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        jax.config.update("jax_disable_most_optimizations", True)
        try:
            yield
        finally:
            jax.config.update("jax_disable_most_optimizations", False)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), TESTS_DIR), len(rank)))  # stable
