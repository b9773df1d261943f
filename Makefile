# digit_vit: `make train` trains the default experiment offline; `make test` runs the tests;
# `make release` trains, measures and exports the released reader (release/reader).
# All create .venv on first use and install the package with the pinned versions of
# requirements.lock (Python 3.11+ and pip are all a fresh machine needs).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
# Test workers: one per core by default (pytest-xdist).
TEST_WORKERS ?= auto
STAMP := $(VENV)/.installed

.PHONY: install browser train test test-fast bench release clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

# Debian's chromium for the demo's browser test (tests/test_demo.py skips without it). Needs
# root and apt-get; elsewhere it says so and goes on, as the test then skips.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	    >/dev/null || echo "make browser: apt-get could not install chromium; the demo's" \
	    "browser test will skip"; \
	else echo "make browser: $(CHROMIUM) is missing and needs root and apt-get to install;" \
	  "the demo's browser test will skip"; fi

# CPU devices `make train` splits each batch over, data-parallel (XLA's host platform; a GPU or
# TPU run is unchanged): on the 2-core laptop it is sized for, 2 trained configs/default.py
# 1.18x faster than 1 to the same figures (docs/performance.md). 1 = one device.
CPU_DEVICES ?= 2
train: $(STAMP)
	XLA_FLAGS="$(XLA_FLAGS) --xla_force_host_platform_device_count=$(CPU_DEVICES)" \
	  $(PY) -m digit_vit.main --config=$(CONFIG) --workdir=$(WORKDIR)

# The whole suite on one CPU device, then again on 8 fake CPU devices so that code which only
# works on one device is caught. The second pass leaves out the tests marked any_device_count,
# whose outcome the device count cannot change (tests/test_device_passes.py checks the marks).
test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests
	XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not any_device_count" tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

bench: $(STAMP)
	$(PY) -m digit_vit.bench --config=configs/bench.py

# The released reader (release/README.md). Each step is a file, so a rerun picks up where the
# last stopped: training resumes from its latest checkpoint (about 2 hours from scratch on a
# 2-core CPU), then the best checkpoint is evaluated on test, wild and long, exported into
# $(RELEASE_WORKDIR)/reader, benchmarked and given its MODEL_CARD.md. Last, that reader replaces
# the one in $(RELEASE_DIR) only if it is within $(RELEASE_MAX_MB) MB and measured better on
# test, wild and long (RELEASE_FORCE=1 replaces it anyway); otherwise make stops with the
# figures side by side. `make release RELEASE_CONFIG=configs/default.py
# RELEASE_WORKDIR=runs/mine RELEASE_DIR=/tmp/reader` makes one elsewhere.
RELEASE_CONFIG ?= configs/long.py
RELEASE_WORKDIR ?= runs/release
RELEASE_DIR ?= release/reader
RELEASE_MAX_MB ?= 16
RELEASE_FORCE ?=
# The release reads each line once, greedily: the serving targets (cold start, p50, throughput)
# are for greedy decoding, and configs/long.py's 25 views cost 11x the reading time for 2-5
# points of exact match (docs/results.md, "configs/long.py on lines of 1-16 digits").
# RELEASE_VIEWS=25 evaluates and exports the views.
RELEASE_VIEWS ?= 1
RELEASE_CANDIDATE = $(RELEASE_WORKDIR)/reader
RELEASE_EVALUATION = $(RELEASE_WORKDIR)/evaluation_release.json
RELEASE_BENCH = $(RELEASE_WORKDIR)/serve.json

release: $(RELEASE_CANDIDATE)/MODEL_CARD.md
	$(PY) -m digit_vit.model_card --model=$(RELEASE_CANDIDATE) --publish_to=$(RELEASE_DIR) \
	  --max_mb=$(RELEASE_MAX_MB) $(if $(RELEASE_FORCE),--force)
	$(PY) -m digit_vit.model_card --model=$(RELEASE_DIR) --check_size --max_mb=$(RELEASE_MAX_MB)

# Order-only on the install: reinstalling the package must not retrain.
$(RELEASE_WORKDIR)/report.json: | $(STAMP)
	$(PY) -m digit_vit.main --config=$(RELEASE_CONFIG) --workdir=$(RELEASE_WORKDIR)

$(RELEASE_EVALUATION): $(RELEASE_WORKDIR)/report.json
	$(PY) -m digit_vit.evaluate --workdir=$(RELEASE_WORKDIR) --checkpoint=best \
	  --views=$(RELEASE_VIEWS) --splits=test,wild,long --output=$@

$(RELEASE_CANDIDATE)/manifest.json: $(RELEASE_EVALUATION)
	$(PY) -m digit_vit.export --workdir=$(RELEASE_WORKDIR) --checkpoint=best \
	  --views=$(RELEASE_VIEWS) --output=$(RELEASE_CANDIDATE)

$(RELEASE_BENCH): $(RELEASE_CANDIDATE)/manifest.json
	$(PY) -m digit_vit.bench --only=serve --workdir=$(RELEASE_WORKDIR) \
	  --model=$(RELEASE_CANDIDATE) --json=$@

$(RELEASE_CANDIDATE)/MODEL_CARD.md: $(RELEASE_BENCH) $(RELEASE_CANDIDATE)/manifest.json
	$(PY) -m digit_vit.model_card --workdir=$(RELEASE_WORKDIR) --model=$(RELEASE_CANDIDATE) \
	  --bench=$(RELEASE_BENCH) --config_file=$(RELEASE_CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache
