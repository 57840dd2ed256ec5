# The README's two commands: `make demo` and `make test`. Both set up everything they need on a
# fresh machine (a local .venv) and are fast and idempotent when run again.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-slow benchmarks clean

# Re-install only when pyproject.toml changes (stamps live inside the venv).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch is pinned to the CPU build 2.13.0 in the `test` extra (an unpinned torch pulls CUDA builds).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/segllm-jax demo --out demo_out

test: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile -q $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
