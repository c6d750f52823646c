# Quick start: `make demo`, then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch from this machine's local disk (a CPU-capable build); torchvision is only for the tests' reference.
TORCH := torch==2.14.1 torchvision==0.29.1
MODEL ?=
DEMO_DIR := .cache/demo-qwen2-vl-2b-awq-random
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
	$(PIP) install -q -e '.[video,tools]'
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[dev,video,server,tools]'
	touch $@

demo: $(VENV)/.demo
ifeq ($(MODEL),)
	@test -f $(DEMO_DIR)/config.json || $(PY) -m qwen2vl.tools.random_checkpoint \
		--config qwen2vl/assets/qwen2-vl-2b-instruct-awq.config.json --quant awq --out $(DEMO_DIR)
	$(VENV)/bin/qwen2vl chat --model $(DEMO_DIR) --image $(IMAGE) --max-tokens $(MAX_TOKENS) --timing "$(PROMPT)"
else
	$(VENV)/bin/qwen2vl chat --model $(MODEL) --image $(IMAGE) --max-tokens $(MAX_TOKENS) --timing "$(PROMPT)"
endif

test: $(VENV)/.dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache
