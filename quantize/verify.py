"""Checks a quantized checkpoint against its original, one layer in memory at a time.

- agreement: mean per-token KL(original || checkpoint) and top-1 agreement on held-out text;
- perplexity on held-out Japanese and English text for the original, the checkpoint, and
  round-to-nearest at the same bits and group size. Round-to-nearest is computed here, on the
  original's weights as each layer loads (`rtn_transform`): a baseline, not a second run.

Every model runs through `layerwise.LayerwiseLM`, which reads the files: it checks what was
written, in any layout, without holding the whole model (a 4x7B in float32 is 180 GB).
`gate` is the quality gate `run.py` applies before publishing: it tells a broken checkpoint (worse
than round-to-nearest of the same model) from a model that is merely sensitive to 4 bits (better
than round-to-nearest, yet past the absolute limit), which may be published on request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from awq import registry
from chat_templates import is_japanese
from quantize import calibration
from quantize.layerwise import LayerwiseLM, WeightTransform

# The checkpoint must agree with the original this closely on held-out text (mean per-token
# KL in nats, top-1 agreement); measured on the test models in the README.
MAX_MEAN_KL = 0.1
MIN_TOP1 = 0.85
# The quality gate before publishing: a few held-out sequences, KL only (random test models
# have near-uniform outputs, so their top-1 says little; a misnamed or broken layer is several
# nats off: 4.15 on the mergekit merge that was published broken before this gate existed).
GATE_TOKENS = 64  # per held-out sequence (calibration.GATE_ROWS of them)


class VerifyError(AssertionError):
    pass


def rtn_weight(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight `--method rtn` writes, as a reader dequantizes it (float32): llm-compressor's
    min-max observer and compressed-tensors' rounding on the weight in the model's own dtype, the
    scale stored in float16 as the AutoAWQ GEMM repack stores it (awq/layout.py). So the gate
    compares a checkpoint with what round-to-nearest really writes, not with an idealised
    float32 rounding, and moegi's own `--method rtn` checkpoint is equal to it. Linear weights
    `[out, in]`, or fused experts `[E, out, in]`, grouped along the input dimension."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from llmcompressor.observers import Observer

    if w.dim() == 3:
        return torch.stack([rtn_weight(e, group_size, dtype) for e in w])
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                            group_size=group_size)
    x = w.to(dtype)
    observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
    qp = observer(x).get_qparams()
    q = quantize(x, qp["scale"], qp["zero_point"], args, dtype=torch.int8)
    groups = x.shape[1] // group_size
    scale = qp["scale"].to(torch.float16).float().reshape(x.shape[0], groups, 1)
    zero = qp["zero_point"].to(torch.int32).reshape(x.shape[0], groups, 1)
    q = q.to(torch.int32).reshape(x.shape[0], groups, group_size)
    out: torch.Tensor = ((q - zero).float() * scale).reshape(x.shape)
    return out


def rtn_transform(group_size: int, original: Path) -> WeightTransform:
    """Round-to-nearest on what the quantizer quantizes (the registry says what stays 16-bit)."""
    config = json.loads((original / "config.json").read_text())
    spec = registry.for_config(config)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))

    def transform(name: str, w: torch.Tensor) -> torch.Tensor:
        if spec.keeps(name):
            return w
        return rtn_weight(w, group_size, dtype)

    return transform


def _token_kls(reference: list[torch.Tensor], candidate: list[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(reference || candidate) in nats, and per-token top-1 agreement (0 or 1)."""
    kls, top1 = [], []
    for a, b in zip(reference, candidate, strict=True):
        p, q = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
        top1.append((p.argmax(-1) == q.argmax(-1)).float())
    return torch.cat(kls), torch.cat(top1)


@torch.no_grad()
def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """(mean per-token KL(reference || candidate) in nats, top-1 agreement)."""
    kl, top1 = _token_kls(reference, candidate)
    return float(kl.mean()), float(top1.mean())


@torch.no_grad()
def measure(reference: list[torch.Tensor], checkpoint: list[torch.Tensor],
            rtn: list[torch.Tensor]) -> Gate:
    """The gate's figures on the same tokens, with the noise of the KL difference: the standard
    error of the mean of the per-token differences (paired: the same tokens in both)."""
    kl, top1 = _token_kls(reference, checkpoint)
    rtn_kl, rtn_top1 = _token_kls(reference, rtn)
    diff = kl - rtn_kl
    noise = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    return Gate(float(kl.mean()), float(top1.mean()), float(rtn_kl.mean()),
                float(rtn_top1.mean()), noise)


def perplexity(logits: list[torch.Tensor], sequences: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for lg, ids in zip(logits, sequences, strict=True):
        logp = torch.log_softmax(lg[:-1], -1)
        target = torch.tensor(ids[1:])
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(ids) - 1
    return math.exp(nll / count)


PASS, SENSITIVE, WORSE, BROKEN = "pass", "sensitive", "worse than round-to-nearest", "broken"
# A checkpoint this many times round-to-nearest's KL is broken, never published. Measured with
# one linear deliberately misread (its output channels reversed, or two experts swapped) in every
# layer: 1.06x to 30x round-to-nearest's KL on tiny-text, 3x to 70x on the default model's merge,
# 14x to 30x on SmolLM2-135M; moegi's own --method rtn checkpoint is 1.00x, exactly (its
# reference is what --method rtn writes, `rtn_weight`). A misread below this factor is still
# refused, as worse than round-to-nearest.
BROKEN_FACTOR = 2.0
# Summation order alone moves a KL by less than this (relative): "equal to round-to-nearest".
EQUAL = 1e-6
# "Worse than round-to-nearest" means worse by more than this many standard errors of the paired
# per-token difference: on a few hundred held-out tokens a KL moves by chance. Seen in CI: the
# tuned default merge at 0.0319 nats against round-to-nearest's 0.0318, top-1 91.3% against
# 90.5%, refused as worse on a difference 0.3% of the KL. Two standard errors is the usual 95%
# bound; a misread layer is refused as broken (BROKEN_FACTOR) whatever the noise.
WORSE_SIGMAS = 2.0


@dataclass(frozen=True)
class Gate:
    """The gate's figures: the checkpoint and round-to-nearest (what `--method rtn` writes for
    the same model and groups) against the original, on the same held-out tokens. One set of
    rules, for the quantizer before it publishes and for `moegi-quantize verify`."""

    kl: float
    top1: float
    rtn_kl: float
    rtn_top1: float
    noise: float = 0.0  # standard error of the mean of the per-token KL differences (measure)

    def verdict(self, min_top1: float = 0.0) -> str:
        """The first rule that fires:
        - BROKEN: KL past BROKEN_FACTOR x round-to-nearest's (a misread layer; never published);
        - WORSE: KL above round-to-nearest's by more than the measurement's noise
          (WORSE_SIGMAS standard errors: the search did harm on this text);
        - SENSITIVE: at least as good as round-to-nearest, but past the absolute limits (the
          model loses more to 4 bits than MAX_MEAN_KL);
        - PASS otherwise.
        WORSE and SENSITIVE are published only with --accept-quality-loss."""
        if self.kl > BROKEN_FACTOR * self.rtn_kl:
            return BROKEN
        if self.kl - self.rtn_kl > max(WORSE_SIGMAS * self.noise, EQUAL * self.rtn_kl):
            return WORSE
        if self.kl > MAX_MEAN_KL or self.top1 < min_top1:
            return SENSITIVE
        return PASS

    def avoided(self) -> float:
        """Share of round-to-nearest's divergence the checkpoint avoids."""
        return 1 - self.kl / self.rtn_kl if self.rtn_kl > 0 else float("nan")

    def figures(self) -> str:
        return (f"mean KL {self.kl:.4f} nats, top-1 {self.top1:.1%}; round-to-nearest at the "
                f"same groups: {self.rtn_kl:.4f} nats, top-1 {self.rtn_top1:.1%}; standard "
                f"error of the difference {self.noise:.4f}")

    def explain(self, min_top1: float = 0.0) -> str:
        verdict = self.verdict(min_top1)
        if verdict == BROKEN:
            return (f"broken: the written checkpoint is more than {BROKEN_FACTOR:g} times as far "
                    f"from the original as plain round-to-nearest ({self.figures()}): a misread "
                    "or misnamed layer does this, not rounding; check that the model loads in "
                    "transformers and report its tensor names")
        if verdict == WORSE:
            return (f"worse than round-to-nearest: the checkpoint is further from the original "
                    f"than plain round-to-nearest of the same model, by more than "
                    f"{WORSE_SIGMAS:g} standard errors ({self.figures()}), so the "
                    "search did harm on this text. Give more calibration text, quantize with "
                    "--method awq (GPTQ's rounding can fit a little text too closely) or "
                    "--method rtn (the plain rounding), or publish it anyway with "
                    "--accept-quality-loss")
        if verdict == SENSITIVE:
            limit = (f"the limit of {MAX_MEAN_KL} nats" if self.kl > MAX_MEAN_KL
                     else f"the top-1 limit of {min_top1:.0%}")
            return (f"sensitive: the checkpoint is at least as good as round-to-nearest (it "
                    f"avoids {max(self.avoided(), 0):.0%} of its divergence) but exceeds "
                    f"{limit} ({self.figures()}): the quantization works and this model is "
                    "sensitive to 4 bits, as small models are. Publish it anyway with "
                    "--accept-quality-loss (the card then says so), or try a smaller "
                    "--group-size or more calibration data")
        return f"within the limit ({self.figures()})"

    def publishable(self, accept_quality_loss: bool, min_top1: float = 0.0) -> bool:
        verdict = self.verdict(min_top1)
        return verdict == PASS or (verdict != BROKEN and accept_quality_loss)


def gate(checkpoint: Path, original: Path, heldout: list[list[int]], group_size: int) -> Gate:
    """A few held-out sequences through the original, the checkpoint and round-to-nearest."""
    seqs = [s[:GATE_TOKENS] for s in heldout]
    reference = LayerwiseLM(original).logits(seqs)
    rtn = LayerwiseLM(original, transform=rtn_transform(group_size, original)).logits(seqs)
    return measure(reference, LayerwiseLM(checkpoint).logits(seqs), rtn)


@dataclass
class Report:
    ppl: dict[str, dict[str, float]]  # row -> {"ja", "en", "all"} (the groups the text has)
    gate: Gate

    @property
    def kl(self) -> float:
        return self.gate.kl

    @property
    def top1(self) -> float:
        return self.gate.top1

    def recovered(self) -> float:
        """Share of round-to-nearest's perplexity loss the checkpoint avoids (the AWQ paper's
        Llama-2-7B figure: about half)."""
        base, ours, rtn = (self.ppl[k]["all"] for k in ("original", "checkpoint", "rtn"))
        return 1 - (ours - base) / (rtn - base) if rtn != base else float("nan")

    def table(self) -> str:
        rows = ["| model | ja ppl | en ppl | all ppl |", "|---|---:|---:|---:|"]
        labels = {"original": "original (unquantized)", "checkpoint": "4-bit (this checkpoint)",
                  "rtn": "round-to-nearest 4-bit, same groups"}
        for key, label in labels.items():
            p = self.ppl[key]
            cells = [f"{p[g]:.3f}" if g in p else "-" for g in ("ja", "en", "all")]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        rows.append("")
        base, ours = self.ppl["original"]["all"], self.ppl["checkpoint"]["all"]
        rows.append(f"The checkpoint avoids {self.recovered():.0%} of round-to-nearest's perplexity "
                    "increase (the AWQ paper's Llama-2-7B figure is about 50%)." if ours > base else
                    "The checkpoint's perplexity is at or below the original's on this text "
                    "(within noise).")
        rows.append(f"Checkpoint vs original: mean KL {self.kl:.4f} nats, "
                    f"top-1 agreement {self.top1:.1%} (limits {MAX_MEAN_KL}, {MIN_TOP1:.0%}); "
                    f"round-to-nearest vs original: {self.gate.rtn_kl:.4f} nats, "
                    f"{self.gate.rtn_top1:.1%}.")
        return "\n".join(rows)


def _group_size(ckpt: Path) -> int:
    import json

    qc = json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "awq":
        raise VerifyError(f"{ckpt} is not an AutoAWQ checkpoint (config.json has no "
                          "quantization_config with quant_method awq)")
    return int(qc["group_size"])


def verify(ckpt: Path, original: Path, eval_file: Path | None = None,
           accept_quality_loss: bool = False) -> Report:
    """Full check of an AWQ GEMM checkpoint against its original; raises VerifyError. A
    sensitive model (better than round-to-nearest, past the limits) passes only when accepted."""
    from transformers import AutoTokenizer

    group_size = _group_size(ckpt)
    texts = calibration.heldout_texts(eval_file)
    tok = AutoTokenizer.from_pretrained(ckpt)
    seqs = [tok.encode(t) for t in texts]
    groups = {"ja": [i for i, t in enumerate(texts) if is_japanese(t)],
              "en": [i for i, t in enumerate(texts) if not is_japanese(t)],
              "all": list(range(len(texts)))}
    logits = {"original": LayerwiseLM(original).logits(seqs),
              "checkpoint": LayerwiseLM(ckpt).logits(seqs),
              "rtn": LayerwiseLM(original, transform=rtn_transform(group_size, original)).logits(seqs)}
    ppl = {name: {g: perplexity([lg[i] for i in idx], [seqs[i] for i in idx])
                  for g, idx in groups.items() if idx}
           for name, lg in logits.items()}
    report = Report(ppl, measure(logits["original"], logits["checkpoint"], logits["rtn"]))
    if not report.gate.publishable(accept_quality_loss, MIN_TOP1):
        raise VerifyError(f"{report.gate.explain(MIN_TOP1)}\n{report.table()}")
    return report
