"""The CPU image and the Compose stack, built and run for real with podman (`make test-images`).

`deploy/podman/images.py` builds the images first (the make target runs it): the base images, or
their stand-ins from Debian's packages where no registry serves them, then `deploy/Dockerfile`
with `RUNTIME=cpu`. These tests then run what a user runs:
- the image as the Dockerfile's header says (`run --shm-size=1g -p ...`), on the embedded model;
- the image with a read-only model folder, `MOEGI_MODEL` and an API key;
- `podman stop` during a stream: the drain ends the request and the container exits 0;
- Compose (podman-compose) with Prometheus scraping moegi with the key from the secret, on the
  built-in model, without any model folder.
The image size and the cold start-up time are printed (`-s`) and kept as test properties.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bench.common import free_port
from tiny.build import ensure_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "podman"))
import images  # noqa: E402  (deploy/podman/images.py: the flags this host needs)

pytestmark = pytest.mark.integration
START_TIMEOUT_S = 600
KEY = "image-test-key"


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise RuntimeError(f"podman {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout.strip()


class Container:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.started = time.monotonic()
        self.id = podman("run", "-d", *images.run_flags(), "--shm-size=1g",
                         "-p", f"127.0.0.1:{self.port}:8000", *args, images.CPU_IMAGE)
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self, field: str) -> str:
        return podman("inspect", "--format", "{{" + field + "}}", self.id)

    def wait_healthy(self) -> None:
        """Runs the image's own HEALTHCHECK until it passes (podman has no timer here)."""
        while time.monotonic() - self.started < START_TIMEOUT_S:
            if self.state(".State.Status") == "exited":
                raise RuntimeError("container exited:\n" + self.logs())
            if subprocess.run(["podman", "healthcheck", "run", self.id],
                              capture_output=True).returncode == 0:
                self.startup_s = time.monotonic() - self.started
                return
            time.sleep(2)
        raise RuntimeError("not healthy in time:\n" + self.logs())

    def logs(self) -> str:
        done = subprocess.run(["podman", "logs", self.id], capture_output=True, text=True)
        return (done.stdout + done.stderr)[-3000:]

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.id, check=False)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None or subprocess.run(
            ["podman", "image", "exists", images.CPU_IMAGE]).returncode:
        pytest.fail("podman or the image is missing: run `make test-images`, which builds it")
    return str(images.CPU_IMAGE)


@pytest.fixture(scope="module")
def embedded(image: str, record_testsuite_property) -> Iterator[Container]:  # type: ignore[no-untyped-def]
    c = Container()
    try:
        c.wait_healthy()
        size = int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 2**30
        print(f"\nimage {image}: {size:.2f} GiB; cold start to healthy: {c.startup_s:.0f} s")
        record_testsuite_property("image_gib", f"{size:.2f}")
        record_testsuite_property("cold_start_s", f"{c.startup_s:.0f}")
        yield c
    finally:
        c.remove()


def test_runs_as_non_root_and_turns_healthy(embedded: Container) -> None:
    assert podman("exec", embedded.id, "id", "-u") == "1000"
    assert embedded.state(".Config.User") == "1000"
    assert embedded.state(".State.Health.Status") == "healthy"


def test_embedded_moe_answers_through_the_published_port(embedded: Container) -> None:
    client = openai.OpenAI(base_url=embedded.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    reply = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "日本の首都はどこですか？"}],
        max_tokens=24, temperature=0)
    text = reply.choices[0].message.content or ""
    assert text.strip() and "</s>" not in text
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24


def test_stop_drains_within_the_grace_period(embedded: Container) -> None:
    """SIGTERM mid-stream: the stream ends (finished, or an error chunk after the drain window),
    and the container exits 0 before podman's grace period would kill it."""
    client = openai.OpenAI(base_url=embedded.url + "/v1", api_key="unused")
    chunks: list[str] = []
    ended = threading.Event()

    def read() -> None:
        try:
            for ev in client.completions.create(model="tiny-chat", prompt="東京は", stream=True,
                                                max_tokens=2000, temperature=1, seed=1,
                                                extra_body={"ignore_eos": True}):
                chunks.append(ev.choices[0].text if ev.choices else "")
        except openai.APIError as exc:  # the drain's error chunk after its window
            chunks.append(f"error: {exc}")
        finally:
            ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(chunks) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chunks, "the stream never started"
    start = time.monotonic()
    podman("stop", "-t", "30", embedded.id, timeout=60)
    took = time.monotonic() - start
    assert ended.wait(10), "the stream did not end when the server stopped"
    assert embedded.state(".State.ExitCode") == "0", embedded.logs()
    assert took < 30, f"stop took {took:.1f} s: killed at the grace period, not drained"


@pytest.fixture(scope="module")
def mounted(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    # The bf16 merge (not the embedded 4-bit model), copied as a user's model folder: readable
    # by all, as the container's user 1000 needs (the test cache's own folders are owner-only).
    model = tmp_path_factory.mktemp("models") / "my-merge"
    shutil.copytree(ensure_model("tiny-chat-moe"), model)
    for p in (model, *model.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    model.parent.chmod(0o755)
    c = Container("-v", f"{model}:/models/my-merge:ro", "-e", "MOEGI_MODEL=/models/my-merge",
                  "-e", f"MOEGI_API_KEY={KEY}", "-e", "MOEGI_CHAT_TEMPLATE=alpaca-ja")
    try:
        c.wait_healthy()
        yield c
    finally:
        c.remove()


def test_read_only_model_folder_with_api_key(mounted: Container) -> None:
    assert httpx.get(mounted.url + "/v1/models").status_code == 401
    client = openai.OpenAI(base_url=mounted.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["my-merge"]  # the folder's name
    reply = client.chat.completions.create(
        model="my-merge", messages=[{"role": "user", "content": "こんにちは"}], max_tokens=8)
    assert reply.choices[0].message.content is not None
    wrote = subprocess.run(["podman", "exec", mounted.id, "touch", "/models/my-merge/x"],
                           capture_output=True)
    assert wrote.returncode != 0  # mounted read-only


def test_compose_stack_scrapes_moegi_on_the_built_in_model(image: str, tmp_path: Path) -> None:
    """moegi and Prometheus under podman-compose, no model folder, the key from the secret."""
    key_file = tmp_path / "moegi_api_key"
    key_file.write_text(KEY)
    key_file.chmod(0o644)  # Prometheus runs as nobody
    env = {**os.environ, "MOEGI_API_KEY": KEY, "MOEGI_API_KEY_FILE": str(key_file),
           "GRAFANA_ADMIN_PASSWORD": "unused", "PROMETHEUS_IMAGE": images.PROMETHEUS_LOCAL,
           "CONTAINERS_CONF": str(images.containers_conf(tmp_path / "containers.conf"))}
    env.pop("MOEGI_MODEL", None)
    env.pop("MOEGI_MODELS", None)
    compose = [str(Path(sys.executable).with_name("podman-compose")), "-p", "moegi-test",
               *[a for f in ("compose.yaml", "compose.cpu.yaml", "compose.podman.yaml")
                 for a in ("-f", str(REPO / "deploy" / f))]]
    try:
        subprocess.run([*compose, "up", "-d", "moegi", "prometheus"], env=env, check=True,
                       timeout=300, capture_output=True)
        moegi = podman("ps", "-q", "--filter", "label=com.docker.compose.service=moegi",
                       "--filter", "label=com.docker.compose.project=moegi-test")
        deadline = time.monotonic() + START_TIMEOUT_S
        healthy = up = False
        while time.monotonic() < deadline and not (healthy and up):
            # moegi by its image's HEALTHCHECK; Prometheus may not answer or have a sample yet.
            healthy = healthy or subprocess.run(["podman", "healthcheck", "run", moegi],
                                                capture_output=True).returncode == 0
            with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
                r = httpx.get("http://127.0.0.1:9090/api/v1/query", params={"query":
                              'up{job="moegi"}'}, timeout=5).json()
                up = r["data"]["result"][0]["value"][1] == "1"
            time.sleep(3)
        assert healthy and up, podman("logs", moegi, check=False)[-3000:]
        targets = httpx.get("http://127.0.0.1:9090/api/v1/targets", timeout=5).json()
        health = [t["health"] for t in targets["data"]["activeTargets"]]
        assert health == ["up"], json.dumps(targets)[:2000]
        # The stack serves the built-in model, through the published port, with the key.
        client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    finally:
        subprocess.run([*compose, "down", "-v", "-t", "5"], env=env, capture_output=True,
                       timeout=300)
