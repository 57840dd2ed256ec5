# The README's two commands: `make demo` and `make test`. Both set up everything they need on a
# fresh machine (a local .venv) and are fast and idempotent when run again.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo lint test test-slow browser clean

# Re-install only when pyproject.toml changes (stamps live inside the venv).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch is pinned to the CPU build 2.13.0 in the `test` extra (an unpinned torch pulls CUDA builds).
# The web demo's Gradio comes with the `demo` extra; its browser test also needs Chromium (see .ci/run).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/segllm-jax demo --out demo_out

# Headless Chromium for the web demo's browser test (Debian packages); best effort: without it that test skips.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver) || \
	  echo "chromium unavailable: the browser test will skip"

# ruff (rules in pyproject.toml [tool.ruff]) and the import layering (pyproject.toml [tool.importlinter]);
# `make test` runs it first.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: $(VENV)/.installed-test lint browser
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder -q --durations=30 $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache .import_linter_cache .grimp_cache
