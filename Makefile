# Two commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedtune-installed

.PHONY: install demo demo-lm test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pinned first: this version resolves to a CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# Best effort, never failing the install: the dashboard's browser test needs Debian's Chromium and skips without it.
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >/dev/null 2>&1 \
		|| echo "note: chromium/chromium-driver not installed; tests/integration/test_dashboard.py's browser test will skip"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedtune simulate

# The generative demo: two hospitals tune SmolLM2 to summarise triage notes under DP (about 16 min on 2 cores).
demo-lm: $(STAMP)
	$(VENV)/bin/fedtune simulate --config simulations/scenarios/clinical-summaries.toml

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/dp_overhead.py

clean:
	rm -rf runs .pytest_cache
