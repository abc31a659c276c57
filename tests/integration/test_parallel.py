"""One model over two vLLM ranks on this machine (vLLM's multiprocessing backend), as the README's
scale-out path says, with the same replies as one process.

- pipeline parallel, 2 stages: the default 4-bit MoE (tiny-chat, on moegi's CPU experts or
  vLLM's AMX ones), against the session's one-process server of the same model;
- tensor parallel, 2 ranks: the tiny dense Llama in float32 (its widths split in two), against
  transformers' float32 forward of the same files, teacher-forced on the served tokens;
- moegi binds each CPU rank to its own core itself (the field notes' "Not enough allowed NUMA
  nodes" otherwise), and refuses before loading what cannot work: a tensor-parallel split that
  breaks the 4-bit model's AWQ groups, and Ray on vLLM's CPU platform (which raises "does not
  support ray" only once its engine has joined the cluster: tried here on a two-node local
  cluster, `ray start --head` plus a second node), and pipeline stages in eager mode (vLLM's CPU
  workers allocate a later stage's buffers only in their compiled warm-up; the first request
  killed the engine when tried).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Server, _start, _stop, greedy_ids
from tiny.build import ensure_model

pytestmark = pytest.mark.integration
PROMPTS = [[1, 300, 301, 302], [1, 420, 77, 500, 12], [1, 260, 261], [1, 599, 598, 597, 596]]


@pytest.fixture(scope="module")
def split_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("parallel")
    servers = {
        "pp": _start("pp", ["--model", str(ensure_model("tiny-chat")), "--served-model-name",
                            "tiny-chat", "--pipeline-parallel-size", "2"], tmp, eager=False),
        "tp": _start("tp", ["--model", str(ensure_model("tiny-llama")), "--served-model-name",
                            "tiny-llama", "--chat-template", "llama-2-chat", "--dtype", "float32",
                            "--tensor-parallel-size", "2"], tmp),
    }
    try:
        yield {name: s.wait() for name, s in servers.items()}
    finally:
        _stop(list(servers.values()))


def test_pipeline_parallel_replies_as_one_process(split_servers: dict[str, Server],
                                                  chat_server: Server) -> None:
    pp = split_servers["pp"]
    for prompt in PROMPTS:
        assert greedy_ids(pp, "tiny-chat", prompt, 12) == greedy_ids(chat_server, "tiny-chat",
                                                                      prompt, 12)
    reply = pp.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "日本の首都はどこですか？"}],
        max_tokens=16, temperature=0)
    one = chat_server.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "日本の首都はどこですか？"}],
        max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == one.choices[0].message.content
    assert "CPU ranks bound to cores 0|1" in pp.log.read_text()


def test_tensor_parallel_replies_as_the_reference_forward(split_servers: dict[str, Server]
                                                          ) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ensure_model("tiny-llama"),
                                                 dtype=torch.float32)
    agree = total = 0
    for prompt in PROMPTS:
        generated = greedy_ids(split_servers["tp"], "tiny-llama", prompt, 12)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + generated[:-1]])).logits[0]
        predicted = logits[len(prompt) - 1:].argmax(-1).tolist()
        agree += sum(p == g for p, g in zip(predicted, generated, strict=True))
        total += len(generated)
    assert agree == total, f"{agree}/{total} tokens agree"


def _refused(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "serve", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "Loading" not in done.stdout + done.stderr  # refused before any weight was read
    return done.stderr


def test_splits_that_cannot_work_are_refused_before_loading() -> None:
    chat = str(ensure_model("tiny-chat"))
    msg = _refused("--model", chat, "--tensor-parallel-size", "2")
    assert "whole AWQ groups of 128" in msg and "--pipeline-parallel-size 2" in msg
    msg = _refused("--model", chat, "--pipeline-parallel-size", "2",
                   "--distributed-executor-backend", "ray")
    assert "does not run on Ray" in msg and "--distributed-executor-backend mp" in msg
    msg = _refused("--model", chat, "--pipeline-parallel-size", "2", "--enforce-eager")
    assert "leave --enforce-eager out" in msg
