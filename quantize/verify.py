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
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from awq import registry
from quantize import calibration
from quantize.layerwise import LayerwiseLM, WeightTransform

# The checkpoint must agree with the original this closely on held-out text (mean per-token
# KL in nats, top-1 agreement); measured on the test models in the README.
MAX_MEAN_KL = 0.1
MIN_TOP1 = 0.85
# The quality gate before publishing: a few held-out sequences, KL only (random test models
# have near-uniform outputs, so their top-1 says little; a misnamed or broken layer is several
# nats off: 4.15 on the mergekit merge that was published broken before this gate existed).
GATE_SEQUENCES = 4
GATE_TOKENS = 64
_JA = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


class VerifyError(AssertionError):
    pass


def fake_quantize(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Round-to-nearest, asymmetric, per group of `group_size` inputs (the last dimension),
    with zero inside every group's range, as compressed-tensors' min-max observer does."""
    shape, top = w.shape, 2**bits - 1
    g = w.float().reshape(-1, shape[-1] // group_size, group_size)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / top).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, top)
    q = (torch.round(g / scale) + zero).clamp(0, top)
    out: torch.Tensor = ((q - zero) * scale).reshape(shape).to(w.dtype)
    return out


def rtn_transform(group_size: int, original: Path) -> WeightTransform:
    """Round-to-nearest on what the quantizer quantizes (the registry says what stays 16-bit)."""
    spec = registry.for_config(json.loads((original / "config.json").read_text()))

    def transform(name: str, w: torch.Tensor) -> torch.Tensor:
        if spec.keeps(name):
            return w
        return fake_quantize(w, group_size)

    return transform


@torch.no_grad()
def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """(mean per-token KL(reference || candidate) in nats, top-1 agreement)."""
    kls, top1 = [], []
    for a, b in zip(reference, candidate, strict=True):
        p, q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kls.append((p.exp() * (p - q)).sum(-1))
        top1.append((p.argmax(-1) == q.argmax(-1)).float())
    return float(torch.cat(kls).mean()), float(torch.cat(top1).mean())


def perplexity(logits: list[torch.Tensor], sequences: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for lg, ids in zip(logits, sequences, strict=True):
        logp = torch.log_softmax(lg[:-1], -1)
        target = torch.tensor(ids[1:])
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(ids) - 1
    return math.exp(nll / count)


PASS, SENSITIVE, BROKEN = "pass", "sensitive", "broken"


@dataclass(frozen=True)
class Gate:
    """The gate's figures: the checkpoint and round-to-nearest (same bits and groups, computed
    on the original's weights) against the original, on the same held-out tokens."""

    kl: float
    top1: float
    rtn_kl: float
    rtn_top1: float

    def verdict(self, min_top1: float = 0.0) -> str:
        """PASS within the absolute limits; BROKEN when worse than round-to-nearest (a misread
        layer is nats off; a working AWQ search never loses to no search at all); SENSITIVE
        otherwise: the search helped, but this model loses more to 4 bits than the limit."""
        if self.kl <= MAX_MEAN_KL and self.top1 >= min_top1:
            return PASS
        return BROKEN if self.kl > self.rtn_kl else SENSITIVE

    def avoided(self) -> float:
        """Share of round-to-nearest's divergence the checkpoint avoids."""
        return 1 - self.kl / self.rtn_kl if self.rtn_kl > 0 else float("nan")

    def figures(self) -> str:
        return (f"mean KL {self.kl:.4f} nats, top-1 {self.top1:.1%}; round-to-nearest at the "
                f"same groups: {self.rtn_kl:.4f} nats, top-1 {self.rtn_top1:.1%}")

    def explain(self, min_top1: float = 0.0) -> str:
        verdict = self.verdict(min_top1)
        if verdict == BROKEN:
            return (f"the written checkpoint is worse than plain round-to-nearest of the same "
                    f"model ({self.figures()}): the AWQ search or the repack went wrong, as a "
                    "misread or misnamed layer does; check that the model loads in transformers "
                    "and report its tensor names")
        if verdict == SENSITIVE:
            return (f"the checkpoint beats round-to-nearest (it avoids {self.avoided():.0%} of "
                    f"its divergence) but exceeds the limit of {MAX_MEAN_KL} nats "
                    f"({self.figures()}): the quantization works and this model is sensitive to "
                    "4 bits, as small models are. Publish it anyway with --accept-quality-loss "
                    "(the card then says so), or try a smaller --group-size or more calibration "
                    "data")
        return f"within the limit ({self.figures()})"


def gate(checkpoint: Path, original: Path, tokenizer: object, group_size: int) -> Gate:
    """A few held-out sequences through the original, the checkpoint and round-to-nearest."""
    texts = calibration.heldout_texts()[:GATE_SEQUENCES]
    seqs = [tokenizer.encode(t)[:GATE_TOKENS] for t in texts]  # type: ignore[attr-defined]
    reference = LayerwiseLM(original).logits(seqs)
    rtn = LayerwiseLM(original, transform=rtn_transform(group_size, original)).logits(seqs)
    return Gate(*compare(reference, LayerwiseLM(checkpoint).logits(seqs)),
                *compare(reference, rtn))


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
        """Share of RTN's perplexity loss that AWQ avoids (AWQ paper, Llama-2-7B: about half)."""
        base, awq, rtn = (self.ppl[k]["all"] for k in ("original", "awq", "rtn"))
        return 1 - (awq - base) / (rtn - base) if rtn != base else float("nan")

    def table(self) -> str:
        rows = ["| model | ja ppl | en ppl | all ppl |", "|---|---:|---:|---:|"]
        labels = {"original": "original (unquantized)", "awq": "AWQ 4-bit (this checkpoint)",
                  "rtn": "round-to-nearest 4-bit, same groups"}
        for key, label in labels.items():
            p = self.ppl[key]
            cells = [f"{p[g]:.3f}" if g in p else "-" for g in ("ja", "en", "all")]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        rows.append("")
        base, awq = self.ppl["original"]["all"], self.ppl["awq"]["all"]
        rows.append(f"AWQ avoids {self.recovered():.0%} of round-to-nearest's perplexity increase "
                    "(the AWQ paper's Llama-2-7B figure is about 50%)." if awq > base else
                    "AWQ's perplexity is at or below the original's on this text (within noise).")
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
    groups = {"ja": [i for i, t in enumerate(texts) if _JA.search(t)],
              "en": [i for i, t in enumerate(texts) if not _JA.search(t)],
              "all": list(range(len(texts)))}
    logits = {"original": LayerwiseLM(original).logits(seqs),
              "awq": LayerwiseLM(ckpt).logits(seqs),
              "rtn": LayerwiseLM(original, transform=rtn_transform(group_size, original)).logits(seqs)}
    ppl = {name: {g: perplexity([lg[i] for i in idx], [seqs[i] for i in idx])
                  for g, idx in groups.items() if idx}
           for name, lg in logits.items()}
    report = Report(ppl, Gate(*compare(logits["original"], logits["awq"]),
                              *compare(logits["original"], logits["rtn"])))
    verdict = report.gate.verdict(MIN_TOP1)
    if verdict == BROKEN or (verdict == SENSITIVE and not accept_quality_loss):
        raise VerifyError(f"{report.gate.explain(MIN_TOP1)}\n{report.table()}")
    # Worse than round-to-nearest, even within the limits: the search did harm. Judged by KL,
    # the gate's measure: perplexity on a few sentences moves by noise on small models (both
    # 4-bit models below the original's, in either order).
    if report.gate.kl > report.gate.rtn_kl:
        raise VerifyError(f"AWQ is worse than round-to-nearest on held-out text (mean KL "
                          f"{report.gate.kl:.4f} against {report.gate.rtn_kl:.4f})\n"
                          f"{report.table()}")
    return report
