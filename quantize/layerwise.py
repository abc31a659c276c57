"""A causal LM's forward pass one decoder layer at a time, read straight from its safetensors.

`verify` (perplexity, agreement) and the quality gate before publishing need a whole model's
logits; a 4x7B in float32 is 180 GB. Here one layer's weights are in memory at a time, beside
the hidden states of the few sequences being scored: peak memory is one layer, the embedding
and head, and the activations, whatever the depth.

It reads every layout a merge or a quantizer writes: fused experts (`mlp.experts.gate_up_proj`,
transformers 5 and mergekit-moe), per-expert `block_sparse_moe.experts.E.w1/w2/w3` (older merges,
transformers 4, and moegi's AutoAWQ output), and AutoAWQ GEMM triples (dequantized per layer).
Each layer is transformers' own module, built from config.json and loaded with `strict=True`,
so a tensor under a name no reader maps is an error here, not random weights.

  H hidden size, I expert intermediate size, E experts, T tokens of one sequence.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch

from awq import registry
from awq.layout import dequantize
from awq.registry import Experts
from quantize.checkpoint import Shards

# A per-layer hook on each (name, weight) of a linear layer: RTN fake-quantization, say.
WeightTransform = Callable[[str, torch.Tensor], torch.Tensor]


def layer_tensors(shards: Shards, index: int, dtype: torch.dtype = torch.float32,
                  transform: WeightTransform | None = None) -> dict[str, torch.Tensor]:
    """Layer `index`'s tensors under names relative to the layer, AWQ triples dequantized."""
    prefix = f"model.layers.{index}."
    out: dict[str, torch.Tensor] = {}
    for key in shards.under(prefix):
        name = key[len(prefix):]
        if name.endswith((".qzeros", ".scales")):
            continue
        if name.endswith(".qweight"):
            base = key[: -len(".qweight")]
            w = dequantize((shards.get(key), shards.get(f"{base}.qzeros"),
                            shards.get(f"{base}.scales")))
            out[name[: -len(".qweight")] + ".weight"] = w.to(dtype)
            continue
        t = shards.get(key)
        out[name] = t.to(dtype) if t.is_floating_point() else t
    if transform is not None:
        # Linear weights ([out, in], or fused experts [E, out, in]); not norms or embeddings.
        out = {k: transform(k, v) if v.dim() >= 2 else v for k, v in out.items()}
    return out


def module_state(tensors: dict[str, torch.Tensor], experts: Experts | None,
                 count: int) -> dict[str, torch.Tensor]:
    """A layer's tensors, from any MoE layout, under the names transformers 5's own modules give
    them (the registry's `modules`: for the families moegi knows, `mlp.gate.weight` [E, H],
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up), `mlp.experts.down_proj`
    [E, H, I]). Dense layers, and a shared expert, pass through unchanged."""
    state: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, str], torch.Tensor] = {}
    for name, t in tensors.items():
        role = experts.match(name) if experts else None
        if role:
            parts[role] = t
        elif experts and name == experts.router:
            state[experts.modules["router"]] = t
        else:
            state[name] = t
    if experts and parts:
        missing = [(e, p) for e in range(count) for p in ("gate", "up", "down")
                   if (e, p) not in parts]
        if missing or len(parts) != 3 * count:
            raise KeyError(f"expert tensors missing or unexpected: {missing[:4]} "
                           f"({len(parts)} found for {count} experts)")
        state[experts.modules["gate_up"]] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(count)])
        state[experts.modules["down"]] = torch.stack([parts[(e, "down")] for e in range(count)])
    return state


class LayerwiseLM:
    """Logits of a checkpoint folder's model, one layer in memory at a time."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32,
                 transform: WeightTransform | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.shards = Shards(folder)
        self.dtype, self.transform = dtype, transform
        raw = json.loads((folder / "config.json").read_text())
        raw.pop("quantization_config", None)
        self.config = AutoConfig.for_model(**raw)
        self.config._attn_implementation = "sdpa"  # causal without a mask for one sequence
        one = copy.deepcopy(self.config)
        one.num_hidden_layers, one.vocab_size = 1, 8  # the skeleton: one layer, no real vocab
        with torch.device("meta"):
            # In the dtype the logits are computed in, not the config's: loading a dequantized
            # float32 weight into a bfloat16 (or float16) module would round it again, and
            # differently for an original (bfloat16) and its checkpoint (float16).
            skeleton = AutoModelForCausalLM.from_config(one, dtype=dtype)  # type: ignore[no-untyped-call]
        self._layer_template = skeleton.model.layers[0]
        self.rotary = type(skeleton.model.rotary_emb)(config=self.config)
        self.spec = registry.for_config(raw)
        self.experts = self.spec.experts.count(raw) if self.spec.experts else 0

    def layer(self, index: int) -> torch.nn.Module:
        layer = copy.deepcopy(self._layer_template).to_empty(device="cpu")
        tensors = layer_tensors(self.shards, index, self.dtype, self.transform)
        layer.load_state_dict(module_state(tensors, self.spec.experts, self.experts), strict=True)
        layer.self_attn.layer_idx = index
        module: torch.nn.Module = layer.to(self.dtype).eval()
        return module

    def _head(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.shards.get("model.norm.weight").to(self.dtype)
        name = "lm_head.weight" if "lm_head.weight" in self.shards.where else \
            "model.embed_tokens.weight"  # tied embeddings
        return norm, self.shards.get(name).to(self.dtype)

    @torch.no_grad()
    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Logits `[T, vocab]` (float32) of each token sequence."""
        embed = self.shards.get("model.embed_tokens.weight")
        hidden = [embed[torch.tensor(s)].to(self.dtype)[None] for s in sequences]  # [1, T, H]
        del embed
        positions = [torch.arange(len(s))[None] for s in sequences]
        rope = [self.rotary(h, p) for h, p in zip(hidden, positions, strict=True)]
        for index in range(self.config.num_hidden_layers):
            layer = self.layer(index)
            hidden = [layer(h, position_embeddings=r, position_ids=p)
                      for h, r, p in zip(hidden, rope, positions, strict=True)]
            del layer
        norm, head = self._head()
        eps = float(getattr(self.config, "rms_norm_eps", 1e-6))
        out = []
        for h in hidden:
            x = h[0].float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            out.append((x.to(self.dtype) * norm) @ head.t())
        return [o.float() for o in out]
