# salience: the two commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.salience-installed

.PHONY: setup browser demo test test-all bench lint clean

setup: $(STAMP)

# Idempotent: the venv is made once; torch 2.13.0 (the CPU build on this machine's disk) is installed
# first so that nothing later pulls a CUDA build, then the package with every extra.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

# Headless Chromium for the HTML report tests: installed when this machine can (root + apt-get);
# otherwise those tests skip with a message saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not available: the HTML browser tests will be skipped"

# The main job: what a real model (the embedded MiniLM) attends to, as an offline HTML report + PNGs + a
# faithfulness table, then the quick evidence run for attention's benefits (accuracy on long sequences,
# alignment, time and memory). Reports land in salience-report/.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/salience explain "The cat sat on the mat because it was warm." \
	  --pair "A cat is resting on a warm rug." --out salience-report/explain
	$(BIN)/salience demo --quick --out salience-report/demo

test: setup browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

test-all: setup browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -m ''

bench: setup
	$(BIN)/salience bench --quick

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist .pytest_cache
