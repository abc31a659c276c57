"""The architecture registry (awq/registry.py): the shipped entries, and a new MoE family added as
one JSON entry, read by every consumer in the quantize stage without a code change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from awq import registry


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(registry.UnsupportedArchitecture) as err:
        registry.lookup("GPT2LMHeadModel")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"):
        assert arch in str(err.value)


def test_mixtral_router_is_compensated_but_never_quantized() -> None:
    spec = registry.lookup("MixtralForCausalLM")
    post = dict(spec.mappings)["re:.*post_attention_layernorm$"]
    assert any("mlp\\.gate$" in b for b in post)
    assert any("gate_proj" in b for b in post) and any("up_proj" in b for b in post)
    assert "re:.*mlp\\.gate$" in spec.ignore and "lm_head" in spec.ignore
    assert spec.modules_to_not_convert == ("gate",)
    name = "model.layers.3.block_sparse_moe.experts.7.{}"
    assert spec.original_name(name.format("gate_proj")) == name.format("w1")
    assert spec.original_name(name.format("up_proj")) == name.format("w3")
    assert spec.original_name(name.format("down_proj")) == name.format("w2")


def test_dense_models_keep_gate_proj_quantized() -> None:
    for arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        spec = registry.lookup(arch)
        # "gate" in modules_to_not_convert would also skip a dense model's gate_proj.
        assert spec.modules_to_not_convert is None
        assert spec.ignore == ("lm_head",)
        assert spec.original_name("model.layers.0.mlp.gate_proj") == "model.layers.0.mlp.gate_proj"


# A made-up MoE family: its own router name, expert names and config keys.
TOY = {
    "architectures": {"ToyMoeForCausalLM": {"family": "toy-moe", "mappings": "toy"}},
    "families": {"toy-moe": {
        "ignore": ["lm_head", "re:.*router$"], "modules_to_not_convert": ["router"],
        "rename": {"\\.experts\\.(\\d+)\\.gate_proj(\\.|$)": ".moe.expert_\\1.wi\\2"},
        "kept": "(embed_tokens|lm_head|norm|(^|\\.)router\\.weight$)",
        "kept_text": "the routers (`router`) and `lm_head`",
        "router": "moe.router.weight",
        "modules": {"router": "mlp.gate.weight", "gate_up": "mlp.experts.gate_up_proj",
                    "down": "mlp.experts.down_proj"},
        "experts": {"pattern": "^moe\\.expert_(\\d+)\\.(wi|wu|wo)\\.weight$",
                    "roles": {"wi": "gate", "wu": "up", "wo": "down"}},
        "config": {"experts": ["n_routed_experts"], "per_token": "top_k"}}},
    "mappings": {"toy": [{"smooth": "re:.*input_layernorm$", "balance": ["re:.*q_proj$"]}]},
}


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> registry.ArchSpec:
    path = tmp_path / "architectures.json"
    path.write_text(json.dumps(TOY))
    monkeypatch.setattr(registry, "REGISTRY", path)
    return registry.lookup("ToyMoeForCausalLM")


def test_a_new_moe_family_is_one_json_entry(toy: registry.ArchSpec) -> None:
    assert toy.is_moe and toy.experts is not None
    assert toy.keeps("model.layers.0.moe.router.weight")
    assert not toy.keeps("model.layers.0.moe.expert_1.wi.weight")
    assert toy.experts.match("moe.expert_3.wo.weight") == (3, "down")
    assert toy.experts.match("moe.router.weight") is None
    assert toy.original_name("model.layers.0.experts.2.gate_proj.weight") == \
        "model.layers.0.moe.expert_2.wi.weight"
    assert toy.modules_to_not_convert == ("router",) and toy.kept_text.startswith("the routers")


def test_the_quantize_stage_reads_the_new_family(toy: registry.ArchSpec, tmp_path: Path) -> None:
    """The size estimate, what stays 16-bit and the layer reader follow the entry: the router
    stays 16-bit, the experts are 4-bit, and the experts are found under their own names."""
    from quantize import layerwise, preflight

    model = tmp_path / "toy"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["ToyMoeForCausalLM"],
                                                   "n_routed_experts": 2}))
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(2, 256, generator=gen)
    experts = {f"moe.expert_{e}.{p}.weight": torch.randn(*shape, generator=gen)
               for e in range(2) for p, shape in (("wi", (64, 256)), ("wu", (64, 256)),
                                                 ("wo", (256, 64)))}
    save_file({"model.layers.0.moe.router.weight": router.to(torch.bfloat16)}, model / "a.safetensors")
    on_disk, out = preflight._tensor_sizes(model, 128, toy)
    assert (on_disk, out) == (2 * 256 * 2, 2 * 256 * 2)  # the router alone: kept at 16 bits
    save_file({f"model.layers.0.{k}": v.to(torch.bfloat16) for k, v in experts.items()},
              model / "b.safetensors")
    on_disk, out = preflight._tensor_sizes(model, 64, toy)
    assert out < on_disk / 3  # the experts at 4 bits

    # What the round-to-nearest reference leaves 16-bit (verify.rtn_transform asks `keeps`).
    assert toy.keeps("moe.router.weight") and not toy.keeps("moe.expert_0.wi.weight")

    state = layerwise.module_state({"moe.router.weight": router, **experts}, toy.experts, 2)
    assert torch.equal(state["mlp.gate.weight"], router)
    assert state["mlp.experts.gate_up_proj"].shape == (2, 128, 256)
    assert torch.equal(state["mlp.experts.down_proj"][1], experts["moe.expert_1.wo.weight"])
    with pytest.raises(KeyError, match="expert tensors missing"):
        layerwise.module_state(experts, toy.experts, 3)


def test_qwen_moe_families_keep_routers_and_the_shared_gate_16_bit() -> None:
    qwen2 = registry.lookup("Qwen2MoeForCausalLM")
    post = dict(qwen2.mappings)["re:.*post_attention_layernorm$"]
    for needed in ("mlp\\.gate$", "experts\\.\\d+\\.gate_proj$", "shared_expert\\.gate_proj$",
                   "shared_expert\\.up_proj$", "shared_expert_gate$"):
        assert any(needed in b for b in post), needed
    assert ("re:.*mlp\\.shared_expert\\.up_proj$", ("re:.*mlp\\.shared_expert\\.down_proj$",)) \
        in qwen2.mappings
    assert qwen2.keeps("model.layers.0.mlp.gate.weight")
    assert qwen2.keeps("model.layers.0.mlp.shared_expert_gate.weight")
    assert not qwen2.keeps("model.layers.0.mlp.shared_expert.gate_proj.weight")
    assert not qwen2.keeps("model.layers.0.mlp.experts.3.gate_proj.weight")
    # vLLM matches these as substrings of module names: never a shared expert's gate_up_proj.
    assert qwen2.modules_to_not_convert == ("mlp.gate", "mlp.shared_expert_gate")
    assert not any(m in "model.layers.0.mlp.shared_expert.gate_up_proj"
                   for m in qwen2.modules_to_not_convert)
    assert qwen2.original_name("model.layers.0.mlp.experts.1.up_proj") == \
        "model.layers.0.mlp.experts.1.up_proj"  # vLLM's Qwen2-MoE loader reads these names
    qwen3 = registry.lookup("Qwen3MoeForCausalLM")
    assert qwen3.experts is not None and qwen3.modules_to_not_convert == ("mlp.gate",)
    # mergekit-moe writes Qwen3-MoE's expert count as num_local_experts, Qwen's own as num_experts.
    assert qwen3.experts.count({"num_local_experts": 3}) == qwen3.experts.count({"num_experts": 3})
    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert registry.lookup(arch).modules_to_not_convert is None


def test_deepseek_moe_is_refused_with_the_reason() -> None:
    with pytest.raises(registry.UnsupportedArchitecture, match="trust_remote_code") as err:
        registry.lookup("DeepseekForCausalLM")
    assert "Qwen2-MoE" in str(err.value)  # and what to merge into instead
    assert registry.refusal({"architectures": ["LlamaForCausalLM"]}) is None
