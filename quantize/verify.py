"""Checks a quantized checkpoint against its original, one layer in memory at a time.

- agreement: mean per-token KL(original || checkpoint) and top-1 agreement on held-out text;
- perplexity on held-out Japanese and English text for the original, the checkpoint, and
  round-to-nearest at the same bits and group size. Round-to-nearest is computed here, on the
  original's weights as each layer loads (`rtn_transform`): a baseline, not a second run.

Every model runs through `layerwise.LayerwiseLM`, which reads the files: it checks what was
written, in any layout, without holding the whole model (a 4x7B in float32 is 180 GB).
`quick_agreement` is the quality gate `run.py` applies before publishing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

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
_NOT_QUANTIZED = re.compile(r"(^|\.)(gate|router)\.weight$")  # MoE routers stay in fp16


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


def rtn_transform(group_size: int) -> WeightTransform:
    def transform(name: str, w: torch.Tensor) -> torch.Tensor:
        if _NOT_QUANTIZED.search(name) or "norm" in name:
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


def quick_agreement(checkpoint: Path, original: Path, tokenizer: object) -> tuple[float, float]:
    """The gate's figures: a few held-out sequences through both models, layer by layer."""
    texts = calibration.heldout_texts()[:GATE_SEQUENCES]
    seqs = [tokenizer.encode(t)[:GATE_TOKENS] for t in texts]  # type: ignore[attr-defined]
    return compare(LayerwiseLM(original).logits(seqs), LayerwiseLM(checkpoint).logits(seqs))


@dataclass
class Report:
    ppl: dict[str, dict[str, float]]  # row -> {"ja", "en", "all"} (the groups the text has)
    kl: float
    top1: float

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
                    f"top-1 agreement {self.top1:.1%} (limits {MAX_MEAN_KL}, {MIN_TOP1:.0%}).")
        return "\n".join(rows)


def _group_size(ckpt: Path) -> int:
    import json

    qc = json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "awq":
        raise VerifyError(f"{ckpt} is not an AutoAWQ checkpoint (config.json has no "
                          "quantization_config with quant_method awq)")
    return int(qc["group_size"])


def verify(ckpt: Path, original: Path, eval_file: Path | None = None) -> Report:
    """Full check of an AWQ GEMM checkpoint against its original; raises VerifyError."""
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
              "rtn": LayerwiseLM(original, transform=rtn_transform(group_size)).logits(seqs)}
    ppl = {name: {g: perplexity([lg[i] for i in idx], [seqs[i] for i in idx])
                  for g, idx in groups.items() if idx}
           for name, lg in logits.items()}
    kl, top1 = compare(logits["original"], logits["awq"])
    report = Report(ppl, kl, top1)
    if kl > MAX_MEAN_KL or top1 < MIN_TOP1:
        raise VerifyError(f"the checkpoint's outputs drift from the original: mean KL {kl:.4f} "
                          f"(limit {MAX_MEAN_KL}), top-1 agreement {top1:.1%} (limit {MIN_TOP1:.0%})"
                          f"\n{report.table()}")
    if ppl["awq"]["all"] > ppl["rtn"]["all"]:
        raise VerifyError(f"AWQ is worse than round-to-nearest on held-out text\n{report.table()}")
    return report
