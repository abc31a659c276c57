"""What loads a moegi checkpoint, and where that was checked: one table, two renderings.

The Loaders table of docs/quantize.md (`docs_table`) and the Loaders section of every checkpoint's
card (`card_rows`, the column for the checkpoint's kind) come from these rows, and a test keeps
the docs' copy equal to `docs_table()`, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loader:
    name: str
    dense: str  # Llama, Mistral, Qwen2, Qwen3
    moe: str  # Mixtral, Qwen2-MoE, Qwen3-MoE
    checked: str  # where and how it was checked


LOADERS = (
    Loader("moegi / vLLM on an x86 CPU",
           "yes: moegi's int4 kernel (vLLM's W4A8 AMX kernel where the CPU has AMX)",
           "yes: moegi's plugin (vLLM's `CPUExpertsInt4` where the CPU has AMX)",
           "`make test`: both served, greedy MoE tokens equal the reference forward"),
    Loader("vLLM `awq_marlin` / `awq` on CUDA", "the layout it reads",
           "the layout it reads (Marlin MoE)", "not run: no GPU in this project's test machine"),
    Loader("TGI", "the layout it reads", "the layout it reads",
           "not run: no GPU, and TGI's image could not be pulled here"),
    Loader("transformers 5 + `gptqmodel`",
           "yes: gptqmodel 7.7.0 picks its `TorchCpuAvx512AwqLinear` kernel; logits within "
           "0.08% of the reference forward, greedy argmax 35 of 35",
           "no: transformers 5 loads the AWQ Mixtral experts as missing weights (its fused "
           "`gate_up_proj` / `down_proj` newly initialized; argmax 14 of 35)",
           "by hand on this CPU (`pip install --no-deps gptqmodel` beside vLLM's torch 2.13 and "
           "transformers 5.19), not in `make test`: gptqmodel 7.7 requires torch >= 2.14.1 and "
           "transformers >= 5.20.2, which vLLM 0.32 does not allow"),
)


def docs_table() -> str:
    rows = ["| Loader | Dense (Llama, Mistral, Qwen2, Qwen3) | MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) "
            "| Where checked |",
            "|---|---|---|---|"]
    rows += [f"| {x.name} | {x.dense} | {x.moe} | {x.checked} |" for x in LOADERS]
    return "\n".join(rows)


def card_rows(moe: bool) -> list[str]:
    """The card's table: the column for this checkpoint's kind."""
    return ["| Loader | Reads it | Checked |", "|---|---|---|",
            *(f"| {x.name} | {x.moe if moe else x.dense} | {x.checked} |" for x in LOADERS)]
