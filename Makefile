# Quick start: `make demo`, then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch from this machine's local disk (a CPU-capable build); torchvision is only for the tests' reference.
TORCH := torch==2.14.1 torchvision==0.29.1
# Empty: the card's Qwen2-VL-2B-Instruct-AWQ if the Hugging Face cache holds it, else the bundled
# demo model (models/qwen2-vl-shapes-demo, trained offline on the shapes task).
MODEL ?=
PROMPT ?= Describe this image.
IMAGE ?= examples/shapes.png
MAX_TOKENS ?= 24

.PHONY: demo test bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.demo: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[video]'
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[dev,video,server,tools]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/qwen2vl chat $(if $(MODEL),--model $(MODEL)) --image $(IMAGE) --max-tokens $(MAX_TOKENS) --timing "$(PROMPT)"

test: $(VENV)/.dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache
