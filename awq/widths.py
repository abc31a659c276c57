"""The widths of a model's linear layers, read once from its config.json for every stage, and
which tensor-parallel splits they allow.

The quantizer picks a group size that divides every input width (`quantize/preflight.py`), the
server refuses a tensor-parallel split that would leave a rank a fraction of a group
(`serve/parallel.py`), and the CPU plugin checks the same before it builds a layer
(`vllm_plugins/awq_cpu.py`). They all read the widths here, so a family with another width (a
shared expert, experts narrower than the dense MLP) is one key in `KEYS`, not three edits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# config.json key -> what reads that width as its input, and whether tensor parallel splits that
# input (row-parallel: o_proj and the down projections) or the output (q/k/v, gate/up).
KEYS: dict[str, tuple[str, bool]] = {
    "hidden_size": ("q/k/v, gate/up and the experts' gate/up", False),
    "intermediate_size": ("the MLP's (or Mixtral experts') down_proj", True),
    "moe_intermediate_size": ("the experts' down_proj", True),
    "shared_expert_intermediate_size": ("the shared expert's down_proj", True),
}
ATTENTION = "the attention o_proj"


@dataclass(frozen=True)
class Widths:
    """Input widths by what reads them: `{description: width}`."""

    inputs: dict[str, int]
    row_parallel: dict[str, int]  # the subset tensor parallel splits by input channel

    def all(self) -> list[int]:
        return sorted(set(self.inputs.values()))


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it)."""
    inner: dict[str, Any] = config.get("text_config") or config
    return inner


def widths(config: dict[str, Any]) -> Widths:
    """The widths of a parsed config.json: every width a quantized linear reads."""
    text = text_config(config)
    inputs: dict[str, int] = {}
    row: dict[str, int] = {}
    for key, (name, split_by_input) in KEYS.items():
        if text.get(key):
            inputs[name] = int(text[key])
            if split_by_input:
                row[name] = int(text[key])
    heads = text.get("num_attention_heads")
    if heads:
        head_dim = text.get("head_dim") or int(text["hidden_size"]) // int(heads)
        inputs[ATTENTION] = row[ATTENTION] = int(heads) * int(head_dim)
    return Widths(inputs, row)


def whole_groups(width: int, group: int, tensor_parallel: int) -> bool:
    """Whether `tensor_parallel` ranks, each holding `width / tensor_parallel` input channels of a
    row-parallel linear, each hold a whole number of AWQ groups: vLLM floors a fraction, and the
    kernels fail at warm-up. The one check the server (before loading) and the CPU kernel hook
    (at construction) both make."""
    return width % tensor_parallel == 0 and (width // tensor_parallel) % group == 0


def tensor_parallel_fits(widths: list[int], group: int, up_to: int) -> list[int]:
    """The tensor-parallel sizes from 1 to `up_to` that give every rank whole groups of each
    width, for an error message that names the sizes that work."""
    return [t for t in range(1, up_to + 1) if all(whole_groups(w, group, t) for w in widths)]
