"""A dense AWQ GEMM checkpoint written by moegi-quantize loads and generates through vLLM (CPU)."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.integration


def test_awq_checkpoint_generates(awq_server: Server) -> None:
    client = awq_server.client()
    reply = client.completions.create(model="tiny-llama-awq", prompt="日本の首都は", max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].text
    again = client.completions.create(model="tiny-llama-awq", prompt="日本の首都は", max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == reply.choices[0].text  # greedy is deterministic
    chat = client.chat.completions.create(model="tiny-llama-awq", max_tokens=4,
                                          messages=[{"role": "user", "content": "こんにちは"}])
    assert chat.usage is not None and chat.usage.completion_tokens >= 1


def test_the_dense_layers_run_on_moegis_native_kernel(awq_server: Server) -> None:
    """vLLM logs `CPUWNA16LinearKernel` while it creates the weights, before the plugin takes the
    layer over, so that line proves nothing; the repack line comes after loading, when only
    moegi's native kernel can read the layers' weights."""
    log = awq_server.log.read_text(errors="replace")
    assert re.search(r"\(Worker[^)]*\).*moegi: dense 4-bit AWQ linears repacked for moegi's "
                     r"native kernel", log), log[-2000:]
    models = httpx.get(awq_server.url + "/v1/models").json()["data"][0]
    assert models["id"] == "tiny-llama-awq"
