"""Shared fixtures: the embedded tiny models (built once, cached) and their tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serve.tiny.build import ensure_model


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
