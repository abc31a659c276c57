"""The fused-experts Mixtral layout (mergekit-moe under transformers 5) read by vLLM's loader."""

from __future__ import annotations

import torch

from vllm_plugins.mergekit_layout import ARCHITECTURE, per_expert, register


def test_fused_experts_split_into_the_per_expert_layout() -> None:
    experts, hidden, inter = 3, 4, 6
    gate_up = torch.randn(experts, 2 * inter, hidden)
    down = torch.randn(experts, hidden, inter)
    router = torch.randn(experts, hidden)
    norm = torch.randn(hidden)
    out = dict(per_expert([
        ("model.layers.0.mlp.gate.weight", router),
        ("model.layers.0.mlp.experts.gate_up_proj", gate_up),
        ("model.layers.0.mlp.experts.down_proj", down),
        ("model.layers.0.post_attention_layernorm.weight", norm),
    ]))
    prefix = "model.layers.0.block_sparse_moe"
    assert torch.equal(out[f"{prefix}.gate.weight"], router)
    for e in range(experts):
        # transformers' MixtralExperts: gate rows first, then up rows (chunk(2) of the output).
        assert torch.equal(out[f"{prefix}.experts.{e}.w1.weight"], gate_up[e, :inter])
        assert torch.equal(out[f"{prefix}.experts.{e}.w3.weight"], gate_up[e, inter:])
        assert torch.equal(out[f"{prefix}.experts.{e}.w2.weight"], down[e])
    assert torch.equal(out["model.layers.0.post_attention_layernorm.weight"], norm)
    assert len(out) == 2 + 3 * experts


def test_per_expert_checkpoints_pass_through() -> None:
    """Older merges (Swallow-MoE-4x7B) and moegi's AWQ checkpoints are already per-expert."""
    names = ["model.layers.1.block_sparse_moe.gate.weight",
             "model.layers.1.block_sparse_moe.experts.0.w1.qweight",
             "model.layers.1.self_attn.q_proj.weight"]
    t = torch.zeros(1)
    assert [n for n, _ in per_expert((n, t) for n in names)] == names


def test_the_plugin_replaces_vllms_mixtral_through_its_registry() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.mixtral import MixtralForCausalLM

    register()
    cls = ModelRegistry.models[ARCHITECTURE].load_model_cls()
    assert issubclass(cls, MixtralForCausalLM) and cls.__name__ == "FusedExpertsMixtral"
    assert cls is ModelRegistry.models[ARCHITECTURE].load_model_cls()  # one class
