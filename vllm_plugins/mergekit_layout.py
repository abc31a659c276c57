"""vLLM plugin: serve Mixtral checkpoints whose experts are stored fused, as mergekit-moe writes them.

`mergekit-moe` 0.1.5 under transformers 5 saves a Mixtral with the experts of each layer in two
tensors and the router under `mlp.`:

    model.layers.N.mlp.gate.weight               [E, H]
    model.layers.N.mlp.experts.gate_up_proj      [E, 2I, H]   (each expert's gate rows, then up)
    model.layers.N.mlp.experts.down_proj         [E, H, I]

(E experts, H hidden, I intermediate). vLLM 0.32's Mixtral loader reads only the per-expert layout
of older merges such as Swallow-MoE-4x7B (`block_sparse_moe.gate`,
`block_sparse_moe.experts.E.w1/w2/w3`) and fails on the fused one ("There is no module or
parameter named 'layers.0.mlp'"). This plugin registers, through vLLM's own model registry, a
`MixtralForCausalLM` whose `load_weights` splits the fused tensors into that layout as they stream
from the shards (a view per expert, no copy of the model), then hands them to vLLM's loader. The
checkpoint on disk is untouched, and a per-expert checkpoint passes through unchanged, so the bf16
merge and its 4-bit checkpoint are served by the same server.

vLLM loads plugins from the `vllm.general_plugins` entry point group in every process it starts;
this one only registers a class path (imported lazily, when vLLM builds a Mixtral).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator

import torch

ARCHITECTURE = "MixtralForCausalLM"
_FUSED = re.compile(r"^(?P<layer>.*)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?P<layer>.*)\.mlp\.gate\.weight$")


def per_expert(weights: Iterable[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """The fused Mixtral layout renamed and split into the per-expert one; others unchanged."""
    for name, tensor in weights:
        if m := _ROUTER.match(name):
            yield f"{m['layer']}.block_sparse_moe.gate.weight", tensor
        elif m := _FUSED.match(name):
            prefix = f"{m['layer']}.block_sparse_moe.experts"
            for e in range(tensor.shape[0]):
                if m["kind"] == "down_proj":
                    yield f"{prefix}.{e}.w2.weight", tensor[e]
                else:
                    gate, up = tensor[e].chunk(2, dim=0)
                    yield f"{prefix}.{e}.w1.weight", gate
                    yield f"{prefix}.{e}.w3.weight", up
        else:
            yield name, tensor


@functools.cache  # one class, however often vLLM resolves the path
def _model_class() -> type:
    from vllm.model_executor.models.mixtral import MixtralForCausalLM

    class FusedExpertsMixtral(MixtralForCausalLM):  # type: ignore[misc]
        """vLLM's Mixtral, reading fused experts too."""

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            loaded: set[str] = super().load_weights(per_expert(weights))
            return loaded

    return FusedExpertsMixtral


def __getattr__(name: str) -> type:
    # vLLM imports the registered class path lazily; building the subclass then imports vLLM's
    # Mixtral, which must not happen while plugins load (before vLLM is configured).
    if name == "FusedExpertsMixtral":
        return _model_class()
    raise AttributeError(name)


def register() -> None:
    """Entry point (`vllm.general_plugins`): replace vLLM's Mixtral with the fused-aware one."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:FusedExpertsMixtral")
