"""A vLLM plugin: a oneDNN ISA cap below AMX means a CPU without AMX for all of vLLM.

`ONEDNN_MAX_CPU_ISA` (oneDNN's documented cap, e.g. `AVX512_CORE_BF16`) keeps oneDNN's matmuls
off AMX tiles, and is how a host with AMX runs what a CPU without AMX runs. But vLLM decides
whether to use its own AMX kernels (attention, `CPUExpertsInt4`, W4A8 linears) from
`torch.cpu._is_amx_tile_supported()`, which reads CPUID only, while Linux grants a process the
AMX tile state only when it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which oneDNN does when it
first uses AMX. Capped, oneDNN never asks, and vLLM's AMX attention dies at its first tile
instruction with SIGILL (seen here on an eager server: `tilezero` in `cpu_attn_amx.hpp`).

So where the cap holds oneDNN below AMX, this makes `torch.cpu._is_amx_tile_supported()` answer
False in every vLLM process (entry point `moegi_cpu_isa`, loaded before vLLM picks its kernels):
vLLM then takes its AVX-512 paths throughout, as on a CPU without AMX, and moegi's plugin runs
the 4-bit layers there as it would on such a CPU.
"""

from __future__ import annotations

import os

import torch

CAP_ENV = "ONEDNN_MAX_CPU_ISA"


def capped_below_amx() -> bool:
    """Whether `ONEDNN_MAX_CPU_ISA` names an ISA without AMX (unset, ALL or an AMX one: no)."""
    cap = os.environ.get(CAP_ENV, "").strip().upper()
    return bool(cap) and cap not in ("ALL", "DEFAULT") and "AMX" not in cap


def register() -> None:
    """Entry point (`vllm.general_plugins`); idempotent."""
    if capped_below_amx() and torch.cpu._is_amx_tile_supported():
        torch.cpu._is_amx_tile_supported = lambda: False  # type: ignore[assignment]
