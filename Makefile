# Two entry points, each sets up .venv (once) then runs:
#   make reproduce   -> normlab reproduce mnist-cnn (the paper's MNIST CNN experiment)
#   make test        -> the test suite
# torch 2.13.0 (CPU build) is installed explicitly first, so pip never pulls a CUDA build.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup reproduce test
setup: $(STAMP)

$(STAMP): pyproject.toml src/normlab/_fused.c
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

reproduce: $(STAMP)
	$(VENV)/bin/normlab reproduce mnist-cnn $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)
