# digit_vit: `make train` trains the default experiment offline; `make test` runs the tests.
# Both create .venv on first use and install the package with the pinned versions of
# requirements.lock (Python 3.11+ and pip are all a fresh machine needs).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
# Test workers: one per core by default (pytest-xdist).
TEST_WORKERS ?= auto
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m digit_vit.main --config=$(CONFIG) --workdir=$(WORKDIR)

# The whole suite on one CPU device, then again on 8 fake CPU devices so that code which only
# works on one device is caught. The second pass leaves out the tests marked any_device_count,
# whose outcome the device count cannot change (tests/test_device_passes.py checks the marks).
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests
	XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not any_device_count" tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

bench: $(STAMP)
	$(PY) -m digit_vit.bench --config=configs/bench.py

clean:
	rm -rf $(VENV) .pytest_cache
