"""Shared fixtures: the embedded tiny models (built once, cached) and their tokenizers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tiny.build import ensure_model

# tests/quantize needs llm-compressor, which lives in its own environment (.venv-quantize);
# `make test` runs that directory there, and the rest here.
if importlib.util.find_spec("llmcompressor") is None:
    collect_ignore = ["quantize"]
else:
    collect_ignore = ["serve", "integration", "vllm_plugins", "images", "deploy", "evals",
                      "chat_templates", "tiny", "awq", "test_layers.py"]


@pytest.fixture(scope="session")
def chat_model_dir() -> Path:
    return ensure_model("tiny-chat")


@pytest.fixture(scope="session")
def llama_model_dir() -> Path:
    return ensure_model("tiny-llama")


@pytest.fixture(scope="session")
def tokenizer(llama_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_model_dir)
