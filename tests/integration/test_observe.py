"""The Grafana dashboard against a real Prometheus that scrapes live moegi servers.

Prometheus (Debian's package, installed by `make prometheus`) runs with the shipped
deploy/prometheus/prometheus.yml, retargeted at the two test servers (one behind an API key,
scraped with `credentials_file` as in Compose). After traffic with errors, a disconnect and an
EOS truncation, every panel's PromQL from deploy/grafana/dashboards/moegi.json runs through
Prometheus' HTTP API with the dashboard variables resolved as Grafana would, and must return
data. A metric renamed in vLLM or in moegi turns this red.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from bench.common import free_port
from tests.integration.conftest import API_KEY, REPO, Server

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "deploy/grafana/dashboards/moegi.json"
PROM_CONFIG = REPO / "deploy/prometheus/prometheus.yml"
RATE_INTERVAL = "1m"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def label_values(self, selector: str, label: str) -> list[str]:
        """What Grafana's `label_values(selector, label)` variable query returns."""
        r = httpx.get(self.url + "/api/v1/series", params={"match[]": selector}, timeout=10)
        return sorted({s[label] for s in r.json()["data"] if label in s})


@pytest.fixture(scope="module")
def prometheus(chat_server: Server, llama_server: Server, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is missing: run `make prometheus` (make test does)")
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "key").write_text(API_KEY)
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    shipped = config["scrape_configs"][0]
    keyed = {**shipped, "authorization": {**shipped["authorization"],
                                          "credentials_file": str(tmp / "key")},
             "static_configs": [{"targets": [llama_server.url.removeprefix("http://")]}]}
    open_ = {k: v for k, v in shipped.items() if k != "authorization"}
    open_ = {**open_, "job_name": "moegi-open",
             "static_configs": [{"targets": [chat_server.url.removeprefix("http://")]}]}
    config["scrape_configs"] = [keyed, open_]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=(tmp / "log").open("wb"), stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                targets = httpx.get(prom.url + "/api/v1/targets", timeout=2).json()
                health = [t["health"] for t in targets["data"]["activeTargets"]]
                if health == ["up", "up"]:
                    break
            except (httpx.HTTPError, ValueError):  # not listening, or 503 before it is ready
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"targets not up: {(tmp / 'log').read_text()[-2000:]}")
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _traffic(chat: Server, llama: Server) -> None:
    c = chat.client()
    # EOS truncation: tiny-chat prints "</s>" as text and goes on; the server cuts it there.
    r = c.chat.completions.create(model="tiny-chat", max_tokens=48, temperature=0,
                                  messages=[{"role": "user", "content": "日本の首都はどこですか？"}])
    assert (r.choices[0].model_extra or {})["stop_type"] == "eos_text"
    for _ in c.chat.completions.create(model="tiny-chat", max_tokens=8, stream=True,
                                           messages=[{"role": "user", "content": "こんにちは"}]):
        pass
    c.completions.create(model="tiny-chat", prompt="富士山は", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny-chat", prompt="x", max_tokens=100000)
    _leave_mid_stream(chat)
    llama.client().completions.create(model="tiny-llama", prompt="hello", max_tokens=4)
    assert httpx.get(llama.url + "/v1/models").status_code == 401


def _leave_mid_stream(chat: Server) -> None:
    """A client that reads the first chunk of a long stream and hangs up. The compiled tiny
    model streams 400 tokens in about 0.2 s and can finish before the server sees the hang-up
    (then nothing was cut and nothing is counted), so the stream is long (32 choices to the
    context limit) and the hang-up is tried again until the server's own /metrics counts it."""
    before = chat.metric("moegi_client_disconnects_total")
    body = {"model": "tiny-chat", "prompt": "東京", "max_tokens": 480, "n": 32, "stream": True,
            "temperature": 1.0, "ignore_eos": True}
    for _ in range(3):
        with httpx.stream("POST", chat.url + "/v1/completions", json=body, timeout=60) as s:
            next(s.iter_lines())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if chat.metric("moegi_client_disconnects_total") > before:
                return
            time.sleep(0.2)
    pytest.fail("three streams left after their first chunk; the server counted no disconnect")


def _regex_value(value: str) -> str:
    """A multi-value variable as Grafana's Prometheus datasource writes it into a PromQL string:
    regex metacharacters escaped, with the backslash itself escaped for the string literal."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def _resolve(expr: str, variables: dict[str, list[str]]) -> str:
    for name, values in variables.items():
        expr = expr.replace(f"${name}", "(" + "|".join(map(_regex_value, values)) + ")")
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def test_every_panel_returns_data(prometheus: Prometheus, chat_server: Server,
                                  llama_server: Server) -> None:
    _traffic(chat_server, llama_server)
    # Let Prometheus scrape the new values a few times (1 s interval).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = prometheus.query('sum(moegi_client_disconnects_total{model="tiny-chat"})')
        if done and float(done[0]["value"][1]) >= 1:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Prometheus never scraped the disconnect the server counted")
    time.sleep(3)
    dashboard = json.loads(DASHBOARD.read_text())
    variables: dict[str, list[str]] = {}
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        variables[var["name"]] = prometheus.label_values(_resolve(m.group(1), variables),
                                                         m.group(2))
        assert variables[var["name"]], f"variable {var['name']} is empty"
    assert {"tiny-chat", "tiny-llama"} <= set(variables["model"])
    assert len(variables["instance"]) == 2
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = _resolve(target["expr"], variables)
            if not prometheus.query(expr):
                empty.append(f"{panel['title']}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_stop_reasons_and_errors_reach_prometheus(prometheus: Prometheus) -> None:
    # Runs after the traffic above: the values the dashboard shows are the ones that happened.
    stops = prometheus.query('sum by (stop_type) (moegi_choices_finished_total{model="tiny-chat"})')
    by_type = {s["metric"]["stop_type"]: float(s["value"][1]) for s in stops}
    assert by_type.get("eos_text", 0) >= 1 and by_type.get("length", 0) >= 1
    errors = prometheus.query("sum by (type) (moegi_errors_total)")
    kinds = {e["metric"]["type"] for e in errors}
    assert {"not_found_error", "invalid_request_error", "authentication_error"} <= kinds
    assert prometheus.query('moegi_requests_total{route="/metrics"}') == []
    assert prometheus.query('moegi_requests_total{route="/health"}') == []
    info = prometheus.query('moegi_model_info{model="tiny-chat"}')
    assert info and info[0]["metric"]["template"] == "alpaca-ja"
    assert prometheus.query('vllm:num_requests_running{model_name="tiny-chat"}')
