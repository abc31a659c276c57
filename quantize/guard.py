"""Each layer keeps the quantization with the least error on the calibration data: never worse
than round-to-nearest.

AutoAWQ's scale search has "no scaling" among its candidates, so a layer never ends worse than
its plain quantization. llm-compressor's AWQ does not guarantee that for the checkpoint moegi
writes: its grid search judges each scale with min-max ranges, while the ranges written are set
afterwards by the recipe's observer (imatrix, whose activation statistics were gathered before
the smoothing changed the weights), and nothing compares the result with round-to-nearest. On
one host the default model's AWQ came out worse than round-to-nearest that way.

So after llm-compressor has finished a decoder layer, its candidates are compared on the same
calibration inputs, by the squared error of the layer's output against the original layer's:

- `recipe`: what the recipe made (AWQ's smoothed weights, the observer's ranges);
- `minmax`: the smoothed weights with min-max ranges (what AWQ's search assumed);
- `rtn`: the original weights with min-max ranges (what `--method rtn` writes);
- with `+gptq` (`--method gptq`: `recipe+gptq`, `rtn+gptq`), the same ranges with GPTQ's
  rounding (each column rounded in turn, the error carried onto the columns not yet rounded,
  through the inverse Hessian of the layer's inputs: llm-compressor's `quantize_weight`). The
  Hessians are taken from the inputs the weights will see, after AWQ's smoothing: stacking
  llm-compressor's GPTQModifier after AWQModifier in one pass would take them before the
  smoothing changed the inputs.

The layer keeps the best. Each candidate is quantized once (fake quantization, as llm-compressor
does in its search) and run over the calibration batches: a forward pass of one layer each (and
one per weight source for the Hessians), next to the twenty per mapping of AWQ's grid search.
An expert sees every calibration token (`moe_calibrate_all_experts`), so its Hessian is never
empty, even for an expert the router never picks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

AWQ_CANDIDATES = ("recipe", "minmax", "rtn")
# Min-max ranges with GPTQ's rounding won only by a hair where they won (SmolLM2-135M: in 6 of
# 30 layers, by under 5% of the output error), for two more passes per layer: not a candidate.
GPTQ_CANDIDATES = ("recipe+gptq", "rtn+gptq", *AWQ_CANDIDATES)
# GPTQ's rounding follows its Hessian (inputs x inputs), which is rank-deficient with fewer
# calibration tokens than inputs: fitted to that text, it does harm on other text. Seen on
# SmolLM2-135M with 2,048 tokens for inputs up to 1,536 wide, on real English prose it never
# saw: mean KL 0.64 nats and perplexity 54.5 with GPTQ, 0.43 and 51.9 with AWQ's candidates
# alone, 0.74 and 54.3 with round-to-nearest. Below this many tokens per input of the widest
# layer, --method gptq runs AWQ's candidates and says so. moegi's default calibration (128 x 512
# tokens) clears it for every width up to 16,384 (Mixtral's 14,336, Swallow-13B's 13,824).
GPTQ_TOKENS_PER_INPUT = 4
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Choice:
    """One layer's candidates and their errors (sum of squares over its calibration outputs)."""

    errors: dict[str, float]

    @property
    def kept(self) -> str:
        return min(self.errors, key=lambda c: self.errors[c])  # ties: the earlier one

    def describe(self) -> str:
        rtn = self.errors["rtn"]
        parts = ", ".join(f"{c} {e / rtn:.3f}" if rtn > 0 else f"{c} {e:.3g}"
                          for c, e in self.errors.items())
        return f"kept {self.kept} (output error relative to round-to-nearest: {parts})"


def state(model: torch.nn.Module, names: list[str]) -> State:
    """Copies of the named parameters and buffers (one layer's: small next to the model)."""
    out = {}
    for full in names:
        module, _, leaf = full.rpartition(".")
        out[full] = getattr(model.get_submodule(module), leaf).detach().clone()
    return out


def load(model: torch.nn.Module, saved: State) -> None:
    from compressed_tensors.offload import update_offload_parameter

    for full, tensor in saved.items():
        module, _, leaf = full.rpartition(".")
        update_offload_parameter(model.get_submodule(module), leaf, tensor)


def weight_args(module: Any) -> Any:
    """The weights' `QuantizationArgs` compressed-tensors attached to a linear."""
    return module.quantization_scheme.weights


def quantized_linears(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    from compressed_tensors.quantization.utils import is_module_quantized

    return [m for m in modules if is_module_quantized(m) and hasattr(m, "weight_scale")]


def minmax_ranges(modules: list[torch.nn.Module]) -> None:
    """Each group's range from its weights' extremes (`memoryless_minmax`, as `--method rtn`)."""
    from compressed_tensors.utils import patch_attrs
    from llmcompressor.modifiers.quantization.calibration import observe, update_qparams
    from llmcompressor.observers import Observer

    observers = [Observer.load_from_registry("memoryless_minmax", base_name="weight",
                                             args=weight_args(m)) for m in modules]
    with patch_attrs(modules, "weight_observer", observers):
        observe(modules, "weight")
        update_qparams(modules, "weight")


@contextlib.contextmanager
def fake_quantized(modules: list[torch.nn.Module]) -> Iterator[None]:
    """The weights replaced by their quantize-dequantize values for the duration (once, not
    per forward), with llm-compressor's quantized forward left disabled."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    originals = []
    for m in modules:
        originals.append(m.weight.data)
        m.weight.data = forward_quantize(m, m.weight.data, "weight",
                                         weight_args(m)).to(m.weight.dtype)
    try:
        yield
    finally:
        for m, w in zip(modules, originals, strict=True):
            m.weight.data = w


class LayerOutputs:
    """The decoder layer's output (hidden states) per calibration batch, captured by a forward
    hook: the subgraph around it may end in the head, whose logits are not what is compared."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer
        self.captured: list[torch.Tensor] = []

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        self.captured = []

        def hook(_module: Any, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self.captured.append(hidden.detach().to("cpu", copy=True))

        handle = self.layer.register_forward_hook(hook)
        try:
            yield self.captured
        finally:
            handle.remove()


def error(run: Any, outputs: LayerOutputs, reference: list[torch.Tensor]) -> float:
    """Sum of squared differences between the layer's outputs now and the reference."""
    with outputs.capture() as got:
        run()
    return float(sum((a.float() - b.float()).pow(2).sum() for a, b in zip(got, reference,
                                                                         strict=True)))


def hessians(linears: list[torch.nn.Module], run: Any) -> dict[torch.nn.Module, torch.Tensor]:
    """Each linear's GPTQ Hessian (2 E[x x^T] of its inputs) over the calibration batches."""
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    acc = {m: (make_empty_hessian(m), torch.zeros(())) for m in linears}

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acc[module] = accumulate_hessian(args[0], module, *acc[module])

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {m: h / n.clamp(min=1) for m, (h, n) in acc.items()}


def gptq_rounding(linears: list[torch.nn.Module], hess: dict[torch.nn.Module, torch.Tensor]) -> None:
    """GPTQ's rounding of each linear with its current ranges; the weights it writes are on the
    quantization grid, so the checkpoint stores exactly them."""
    from compressed_tensors.offload import update_offload_parameter
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    for m in linears:
        weight, scale, zero = (getattr(m, n).data for n in ("weight", "weight_scale",
                                                            "weight_zero_point"))
        # quantize_weight works in its Hessian's memory: a copy, as each is used more than once.
        w, _, _ = quantize_weight(weight[None].float(), hess[m][None].clone(), scale[None],
                                  zero[None], None, weight_args(m))
        update_offload_parameter(m, "weight", w[0].to(weight.dtype))


def keep_best(model: torch.nn.Module, names: list[str], modules: list[torch.nn.Module],
              original: State, outputs: LayerOutputs, reference: list[torch.Tensor],
              run: Any, candidates: tuple[str, ...] = AWQ_CANDIDATES) -> Choice:
    """Compare the candidates on the layer as llm-compressor left it; leave the best in place.
    `run` runs the layer's subgraph over every calibration batch."""
    linears = quantized_linears(modules)
    recipe = state(model, names)
    hess: dict[str, dict[torch.nn.Module, torch.Tensor]] = {}  # per weight source
    errors: dict[str, float] = {}
    best: State = recipe
    for name in candidates:
        base, _, rounding = name.partition("+")
        load(model, original if base == "rtn" else recipe)
        source = "original" if base == "rtn" else "smoothed"
        if rounding and source not in hess:
            hess[source] = hessians(linears, run)
        if base != "recipe":
            minmax_ranges(linears)
        if rounding:
            gptq_rounding(linears, hess[source])
        with fake_quantized(linears):
            errors[name] = error(run, outputs, reference)
        if name == min(errors, key=errors.__getitem__):  # ties keep the earlier candidate
            best = state(model, names)
    load(model, best)
    return Choice(errors)
