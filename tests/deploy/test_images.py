"""deploy/podman/images.py, the parts that need no podman: a host's pip configuration becomes
build arguments and read-only mounts (never ENV in the image), and the runtime flags stay under
the host's hard limits."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "podman"))
import images


def test_a_hosts_pip_configuration_is_passed_in_not_baked(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    wheels, ca = tmp_path / "wheels", tmp_path / "ca.crt"
    wheels.mkdir()
    ca.write_text("cert")
    (tmp_path / "pypi" / "simple").mkdir(parents=True)
    listing = (f"global.find-links='{wheels}'\n:env:.cert='{ca}'\n"
               f"global.extra-index-url='file://{tmp_path}/pypi/simple'\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=listing))
    build_args, mounts = images.pip_sources(tmp_path)
    assert build_args == ["--build-arg", "PIP_CONFIG_FILE=/run/moegi-pip.conf", "--build-arg",
                          f"PIP_EXTRA_INDEX_URL=file://{tmp_path}/pypi/simple"]
    conf = (tmp_path / "pip.conf").read_text()
    assert f"find-links = {wheels}" in conf and f"cert = {images.HOST_CA}" in conf
    pairs = {mounts[i + 1] for i in range(0, len(mounts), 2)}
    assert pairs == {f"{wheels}:{wheels}:ro", f"{ca}:{images.HOST_CA}:ro",
                     f"{tmp_path}/pypi:{tmp_path}/pypi:ro",
                     f"{tmp_path}/pip.conf:/run/moegi-pip.conf:ro"}


def test_a_host_without_pip_configuration_keeps_the_dockerfiles_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=""))
    build_args, _ = images.pip_sources(tmp_path)
    assert build_args == ["--build-arg", "PIP_CONFIG_FILE=/run/moegi-pip.conf"]  # torch index: ARG default


def test_ulimits_stay_under_the_hard_limits(tmp_path: Path) -> None:
    flags = images.run_flags()
    limits = dict(flags[i + 1].split("=") for i, f in enumerate(flags) if f == "--ulimit")
    for name, res in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = (int(x) for x in limits[name].split(":"))
        assert soft == hard and (resource.getrlimit(res)[1] == resource.RLIM_INFINITY
                                 or hard <= resource.getrlimit(res)[1])
    conf = images.containers_conf(tmp_path / "c.conf").read_text()
    assert f'"nofile={limits["nofile"]}"' in conf
