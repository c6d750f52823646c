# Quick start: `make demo`, then `make test`. Both create .venv on first use; the demo installs only
# what it runs (torch and the core dependencies), `make test` adds the dev extras and torchvision.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch from this machine's local disk (a CPU-capable build); torchvision only for the tests' reference.
TORCH := torch==2.14.1
TORCHVISION := torchvision==0.29.1
# Empty: the card's Qwen2-VL-2B-Instruct-AWQ if the Hugging Face cache holds it, else the bundled
# demo model (models/qwen2-vl-shapes-demo, trained offline on the shapes task).
MODEL ?=
PROMPT ?= Describe this image.
IMAGE ?= examples/shapes.png
MAX_TOKENS ?= 24

.PHONY: demo test bench clean

$(VENV)/.base:
	@echo "== creating $(VENV) and installing $(TORCH) from this machine's disk (about a minute, 5.5 GB with its CUDA libraries) =="
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install $(TORCH)
	touch $@

$(VENV)/.demo: $(VENV)/.base pyproject.toml
	@echo "== installing qwen2vl (editable) and what the demo needs: safetensors, tokenizers, pillow, numpy, jinja2 =="
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	@echo "== installing the test and dev extras: transformers, qwen-vl-utils, av, torchvision, fastapi, openai, ... =="
	$(PIP) install -e '.[dev,video,server,tools]' $(TORCHVISION)
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/qwen2vl chat $(if $(MODEL),--model $(MODEL)) --image $(IMAGE) --max-tokens $(MAX_TOKENS) --timing "$(PROMPT)"

test: $(VENV)/.dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache
