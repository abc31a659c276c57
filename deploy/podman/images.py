"""Build moegi's CPU image with podman, on a machine with or without a registry.

    python3 deploy/podman/images.py            # base images, then moegi:cpu
    python3 deploy/podman/images.py --args     # print the podman flags this machine needs

What it does, in order:
- **Base images.** `python:3.11-slim-bookworm` and `debian:bookworm-slim` are pulled where a
  registry answers. Where none does (this project's CI machines), local stand-ins with the same
  names are built from Debian's own packages: `debootstrap --variant=minbase bookworm`, imported
  as `debian:bookworm-slim`, then `python-standin.Containerfile` on it (bookworm's Python is 3.11).
  Prometheus gets `deploy/prometheus/Containerfile.debian` (Debian's package) the same way, for the
  Compose test where `prom/prometheus` cannot be pulled.
- **The machine's package sources, passed in, never baked in.** The host's pip configuration (a
  local wheel folder, file indexes, a constraints file, a CA bundle for a proxy) becomes build
  arguments that deploy/Dockerfile declares as `ARG` (visible to its `RUN` lines, absent from the
  image), with the folders mounted read-only into the build.
- **The default model, when the host has built it.** The host's model cache is mounted where
  the Dockerfile's first stage looks (`MOEGI_PREBUILT`): a model built from the same sources is
  copied instead of trained again (minutes on 2 cores); anything else is built in the image.
- **Podman's runtime flags.** `--runtime runc` and explicit `--ulimit`s at this host's hard limits:
  crun 1.8 fails on cgroup hybrid mode, and podman's default rlimits cannot be raised in some
  sandboxes (field notes). `containers_conf()` writes the same as a containers.conf, for
  podman-compose.

Standard library only: it runs before any project environment exists.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1]
REPO = DEPLOY.parent
PYTHON_BASE = "python:3.11-slim-bookworm"
DEBIAN_BASE = "debian:bookworm-slim"
PROMETHEUS_LOCAL = "localhost/moegi-prometheus:debian"
CPU_IMAGE = "localhost/moegi:cpu"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Caps under the hard limits: on this project's sandboxed hosts runc could not set nproc 65536
# (EPERM) although `ulimit -Hu` said 96365; 32768 worked. Plenty for one server.
ULIMIT_CAP = {"nofile": 65536, "nproc": 32768}


def podman(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(["podman", *args], check=check, text=True, stdout=out, stderr=out)


def _ulimits() -> list[str]:
    """`name=soft:hard` per rlimit, no higher than this host's hard limits."""
    out = []
    for name, res in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(res)[1]
        n = ULIMIT_CAP[name] if hard == resource.RLIM_INFINITY else min(hard, ULIMIT_CAP[name])
        out.append(f"{name}={n}:{n}")
    return out


def run_flags() -> list[str]:
    """What `podman run`/`build` needs here: runc, and rlimits no higher than the hard ones."""
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    return runtime + [f for u in _ulimits() for f in ("--ulimit", u)]


def containers_conf(path: Path) -> Path:
    """The same settings as a containers.conf (`CONTAINERS_CONF=path`), for podman-compose."""
    lines = ["[containers]", "default_ulimits = [" + ", ".join(f'"{u}"' for u in _ulimits()) + "]"]
    if shutil.which("runc"):
        lines += ["[engine]", 'runtime = "runc"']
    path.write_text("\n".join(lines) + "\n")
    return path


HOST_CA = "/run/moegi-host-ca.crt"  # where a host CA bundle is mounted in a build


def pip_sources(conf_dir: Path) -> tuple[list[str], list[str]]:
    """The host's pip configuration as build arguments and read-only mounts: a pip.conf written
    to `conf_dir` (deploy/Dockerfile's `ARG PIP_CONFIG_FILE`) and the folders it names."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], text=True,
                         capture_output=True).stdout
    config: dict[str, str] = {}
    for line in out.splitlines():  # `global.find-links='/opt/wheels'`, `:env:.cert='...'`
        m = re.match(r"[^.]*\.([a-z-]+)='(.*)'$", line)
        if m:
            config.setdefault(m.group(1), m.group(2))
    mounts: dict[str, str] = {}
    conf = ["[global]"]
    for key in ("find-links", "constraint", "cert"):
        if key in config and Path(config[key]).exists():
            inside = HOST_CA if key == "cert" else config[key]
            mounts[config[key]] = inside
            conf.append(f"{key} = {inside}")
    indexes = config.get("extra-index-url", "").split()
    for url in indexes:
        if url.startswith("file:///"):
            folder = str(Path(url.removeprefix("file://")).parent)
            mounts[folder] = folder
    (conf_dir / "pip.conf").write_text("\n".join(conf) + "\n")
    mounts[str(conf_dir / "pip.conf")] = "/run/moegi-pip.conf"
    build_args = ["--build-arg", "PIP_CONFIG_FILE=/run/moegi-pip.conf"]
    if indexes or "find-links" in config:
        # A host with its own package sources (a wheel folder, a mirror) gets torch from them,
        # as `make` does there; the Dockerfile's default, PyTorch's CPU index, may be out of
        # reach from it. (The environment outranks pip.conf, so the indexes go here.)
        build_args += ["--build-arg", "PIP_EXTRA_INDEX_URL=" + " ".join(indexes)]
    return build_args, [f for src, dst in sorted(mounts.items()) for f in ("-v", f"{src}:{dst}:ro")]


def prebuilt() -> list[str]:
    """The host's model cache, read-only where the Dockerfile's first stage looks for the default
    model: built by `make models` from the same sources, it is copied instead of trained again
    (the stage checks the fingerprint, and builds the model itself on any mismatch)."""
    models = Path(os.environ.get("MOEGI_CACHE", Path.home() / ".cache" / "moegi")) / "models"
    return ["-v", f"{models}:/run/moegi-prebuilt:ro"] if models.is_dir() else []


def have(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def pulled(image: str) -> bool:
    try:
        return subprocess.run(["podman", "pull", "-q", image], timeout=120,
                              capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def debian_base() -> None:
    if have(DEBIAN_BASE) or pulled(DEBIAN_BASE):
        return
    print(f"no registry serves {DEBIAN_BASE}: building a stand-in with debootstrap from {MIRROR}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="moegi-rootfs-") as root:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", root, MIRROR], check=True,
                       stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-q", "--change", 'CMD ["bash"]', "-",
                        DEBIAN_BASE], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        tar.wait()


def build(tag: str, containerfile: Path, extra: list[str] | None = None) -> None:
    # Docker's image format: podman's default (OCI) has no HEALTHCHECK and drops it.
    podman("build", "--pull=never", "--format", "docker", *run_flags(), *(extra or []), "-f",
           str(containerfile), "-t", tag, str(REPO))


def bases() -> None:
    debian_base()
    if not (have(PYTHON_BASE) or pulled(PYTHON_BASE)):
        build(PYTHON_BASE, DEPLOY / "podman" / "python-standin.Containerfile")
    if not have(PROMETHEUS_LOCAL):
        build(PROMETHEUS_LOCAL, DEPLOY / "prometheus" / "Containerfile.debian")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--args", action="store_true", help="print the flags and stop")
    parser.add_argument("--bases-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moegi-pip-") as conf_dir:
        build_args, mounts = pip_sources(Path(conf_dir))
        if args.args:
            print(" ".join(run_flags() + build_args + mounts))
            print((Path(conf_dir) / "pip.conf").read_text())
            return
        bases()
        if not args.bases_only:
            build(CPU_IMAGE, DEPLOY / "Dockerfile", ["--build-arg", "RUNTIME=cpu", *build_args,
                                                     *mounts, *prebuilt()])


if __name__ == "__main__":
    main()
