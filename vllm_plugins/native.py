"""moegi's native int4 CPU kernels (`csrc/int4.cpp`): built once, loaded into every process.

The C++ source is compiled by `torch.utils.cpp_extension` with the g++ that vLLM's compiled mode
already needs, the first time a process asks for it, into `$MOEGI_CACHE/native/<key>` (the key
hashes the source, torch's version and the flags, so an upgrade rebuilds). A file lock keeps two
processes (vLLM's engine and its worker, two servers, a test) from building at once; the second
loads what the first built. `make install` builds it ahead (`python -m vllm_plugins.native`),
so a server never compiles while starting.

Where no compiler is found, or the build fails, `load()` warns once and returns False: the plugin
then runs the pure-torch kernels (`int4_cpu.py`), which stay the tests' reference. The ops, once
loaded, are `torch.ops.moegi_native.{linear, moe, repack, isa}`; their fake (meta)
implementations here let vLLM's torch.compile trace through them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
from pathlib import Path

import torch

from vllm_plugins.int4_cpu import log

SOURCE = Path(__file__).with_name("csrc") / "int4.cpp"
FLAGS = ("-O3", "-fopenmp", "-std=c++17")
# torch's libgomp (loaded with torch) serves the OpenMP runtime: the kernels' threads are the
# ones torch and vLLM's thread binding use.
LDFLAGS = ("-fopenmp",)
DISABLE_ENV = "MOEGI_NATIVE"  # "0": never build or use the native kernels
_STATE: dict[str, bool] = {}


def cache_dir() -> Path:
    root = Path(os.environ.get("MOEGI_CACHE", Path.home() / ".cache" / "moegi"))
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                         + " ".join(FLAGS + LDFLAGS).encode()).hexdigest()[:12]
    return root / "native" / key


def _build() -> None:
    from torch.utils.cpp_extension import load as cpp_load

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the next process loads it
        with contextlib.redirect_stdout(sys.stderr):
            cpp_load(name=f"moegi_native_{folder.name}", sources=[str(SOURCE)],
                     build_directory=str(folder), extra_cflags=list(FLAGS),
                     extra_ldflags=list(LDFLAGS), is_python_module=False, verbose=False)


def load() -> bool:
    """Build (first time) and load the kernels into this process; False where they cannot be."""
    if "ok" in _STATE:
        return _STATE["ok"]
    ok = False
    if os.environ.get(DISABLE_ENV, "1") == "0":
        log.info("moegi: native int4 kernels off (%s=0); the pure-torch kernels run", DISABLE_ENV)
    else:
        try:
            _build()
            _register_fakes()
            ok = True
        except Exception as exc:  # no compiler, a failed build: the pure-torch path, same numbers
            log.warning("moegi: the native int4 kernels could not be built (%s: %s); the "
                        "pure-torch kernels run instead (slower). Install g++ to get them.",
                        type(exc).__name__, str(exc).strip().splitlines()[-1:] or "")
    _STATE["ok"] = ok
    return ok


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the real ops run at execution)."""
    if _STATE.get("fakes"):
        return

    @torch.library.register_fake("moegi_native::linear")  # type: ignore[untyped-decorator]
    def _linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("moegi_native::moe")  # type: ignore[untyped-decorator]
    def _moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             w13: torch.Tensor, s13: torch.Tensor, z13: torch.Tensor, w2: torch.Tensor,
             s2: torch.Tensor, z2: torch.Tensor, weight_on_input: bool) -> torch.Tensor:
        return torch.empty_like(x)

    _STATE["fakes"] = True


BLOCK = 64  # output channels per block of the packed layout
QBLOCK = 32  # inputs per activation scale: a group size must be a multiple of it


def runs(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether the native kernels take a linear of this shape (else the pure-torch path)."""
    return (group_size % QBLOCK == 0 and in_features % group_size == 0
            and out_features % BLOCK == 0)


def runs_experts(hidden: int, intermediate: int, group_size: int) -> bool:
    """Whether the native MoE op takes these experts: w13's gate and up halves alternate by
    blocks of 64 channels, so each half must be whole blocks."""
    return runs(hidden, 2 * intermediate, group_size) and intermediate % BLOCK == 0 and runs(
        intermediate, hidden, group_size)


def isa() -> str:
    """Which kernels run on this CPU: "avx512_vnni", "avx2" or "scalar"."""
    out: str = torch.ops.moegi_native.isa()
    return out


if __name__ == "__main__":  # `make install`: build once, ahead of the first server
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not load():
        raise SystemExit(1)
    print(f"moegi native int4 kernels: {cache_dir()} ({isa()})")
