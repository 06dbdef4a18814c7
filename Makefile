# HIE-Bench: `make demo` and `make test` are the two commands a new user needs (see README.md).
# Everything a fresh machine lacks is installed from here: the Python virtualenv with the pinned stack
# and, for the browser tests, Debian's chromium.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Data and results of the demo live in the git-ignored folders below.
DEMO_DATA    := datasets/hie-synth-demo
DEMO_RESULTS := results/demo

.PHONY: help install demo test test-fast perf app clean system-deps

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt keeps torch at the CPU build on disk (see the comments in it).
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# Test-only parity reference for panoptic quality; its numpy<2.3 pin would downgrade numpy.
	$(BIN)/python -m pip install --quiet --no-deps "panoptica==2.1.7"
	touch $@

install: $(STAMP)  ## Create .venv with the pinned stack.

system-deps:  ## Debian packages: bubblewrap (the prediction sandbox) and chromium (browser tests), via apt-get when missing.
	@command -v bwrap >/dev/null 2>&1 || { \
	  echo "installing Debian's bubblewrap for the prediction sandbox"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null; } \
	  || echo "warning: could not install bubblewrap (not root, or no package mirror): runs need --unsafe-no-sandbox"; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; } \
	  || echo "warning: could not install chromium (not root, or no package mirror): the browser test will be skipped"; }

demo: $(STAMP) system-deps  ## Synthetic multi-site dataset, benchmark of the shipped submissions, leaderboard.
	$(BIN)/bench demo --data $(DEMO_DATA) --results $(DEMO_RESULTS)

test: $(STAMP) system-deps  ## The whole test suite (what CI runs).
	$(BIN)/python -m pytest -q -n 2

test-fast: $(STAMP)  ## Tests not marked slow.
	$(BIN)/python -m pytest -q -m "not slow"

perf: $(STAMP)  ## Speed benchmarks against medpy, MONAI, surface-distance and nnU-Net.
	$(BIN)/bench perf metrics

app: $(STAMP)  ## Open the web app on the demo results.
	HIE_BENCH_RESULTS_DIR=$(DEMO_RESULTS) $(BIN)/streamlit run app.py

clean:  ## Remove generated data and results (keeps .venv).
	rm -rf $(DEMO_DATA) results .pytest_cache
