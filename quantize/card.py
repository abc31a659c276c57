"""The model card (`README.md`) written into every quantized checkpoint.

It records what a user needs to trust and run the checkpoint: the quantization table (bits,
group size, zero point, calibration data and length, size on disk), the prompt format, and the
commands for moegi, vLLM, TGI and transformers.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from quantize import loaders
from quantize.options import Options, Result


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _size(n: int) -> str:
    """Bytes in GiB, or in MiB below a quarter GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


METHOD_NAMES = {"awq": "AWQ (activation-aware)",
                "gptq": "AWQ smoothing with GPTQ rounding (activation-aware, error-compensating)",
                "rtn": "round-to-nearest"}


def render_card(opts: Options, result: Result) -> str:
    name = opts.out.name
    base = opts.model.name
    spec = result.spec
    c = result.calib
    fmt = "AutoAWQ GEMM" if opts.format == "awq-gemm" else "compressed-tensors pack-quantized"
    quant_method = "awq" if opts.format == "awq-gemm" else "compressed-tensors"
    method = METHOD_NAMES[opts.method]
    kept = spec.kept_text
    lines = [
        f"# {name}",
        "",
        f"4-bit {method} quantization of `{base}` ({spec.architecture}), made with "
        f"moegi's `moegi-quantize` on llm-compressor "
        f"{_version('llmcompressor')}.",
        "",
        "## Quantization",
        "",
        "| | |",
        "|---|---|",
        f"| Method | {method}, weights only (W4A16) |",
        f"| Format | {fmt} (`quant_method: {quant_method}`) |",
        "| Bits | 4 |",
        f"| Group size | {opts.group_size} |",
        "| Zero point | yes (asymmetric) |",
        *([f"| Group ranges | `{opts.observer}` observer (llm-compressor) after AWQ scaling |"]
          if opts.method != "rtn" else []),
        f"| Not quantized | {kept} |",
        f"| Calibration data | {c.source} |",
        f"| Calibration samples | {len(c.samples)} sequences, {c.num_tokens} tokens, "
        f"at most {c.seq_len} tokens each |",
        f"| Instruction rows rendered as | {c.prompt_format} |",
        f"| Size on disk | {_size(result.size_bytes)} |",
        f"| Quantized on | {result.device}, {result.seconds:.0f} s, peak RSS "
        f"{result.peak_rss_gb:.1f} GiB |",
        f"| Checked before publishing | against the original on held-out text, read back "
        f"from these files: {result.gate.figures()} |",
        "",
        *([f"**Past moegi's quality limit, published on request (`--accept-quality-loss`)**: "
           f"{result.gate.explain()}.", ""] if result.gate.verdict() != "pass" else []),
        *([f"Group size: {result.group_note}.", ""] if result.group_note else []),
        *([f"Every expert is calibrated on every calibration token "
           f"(`moe_calibrate_all_experts`). {spec.card_text}", ""] if spec.is_moe else []),
        "## Prompt format",
        "",
        (f"{c.prompt_format}. The template is shipped in this folder's tokenizer files "
         "(`chat_template.jinja` when the original tokenizer had none), so the commands below "
         "apply it to chat requests." if not c.prompt_format.startswith("plain text") else
         "No chat template: the original tokenizer has none and no moegi preset matches the "
         "model's name. Serve it with `--chat-template NAME` (or `--preset NAME`) to choose one."),
        "",
        "## Loaders",
        "",
        "What reads this checkpoint, and what moegi checked (its test suite runs on a CPU; no "
        "GPU, TGI or Docker engine was available there):",
        "",
        *loaders.card_rows(spec.is_moe),
        "",
        "## Run it",
        "",
        "moegi (OpenAI-compatible API, EOS truncation, Japanese-safe streaming; on a CPU its vLLM "
        "plugin runs 4-bit MoE experts; vLLM reads the method from config.json and picks its "
        "fastest kernel, Marlin on CUDA, so no `--quantization` flag is needed):",
        "",
        "```sh",
        f"moegi-serve --model ./{name}",
        "```",
        "",
        "vLLM:",
        "",
        "```sh",
        f"vllm serve ./{name} --quantization {'awq_marlin' if quant_method == 'awq' else quant_method}",
        "```",
        "",
        "Text Generation Inference:",
        "",
        "```sh",
        f"docker run --gpus all -v $PWD/{name}:/model ghcr.io/huggingface/text-generation-inference "
        "--model-id /model --quantize awq" if quant_method == "awq" else
        "# TGI reads the AutoAWQ GEMM format: quantize again with --format awq-gemm",
        "```",
        "",
        *(["transformers: not for this MoE checkpoint (transformers 5 loads AWQ MoE experts as "
           "missing weights); use vLLM or moegi."] if spec.is_moe else [
            "transformers 5, through the `gptqmodel` package (`pip install gptqmodel`):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("./{name}", device_map="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("./{name}")',
            "```"]),
        "",
        "## Check it",
        "",
        "```sh",
        f"moegi-quantize verify ./{name} --original {opts.model}",
        "```",
        "",
        "prints held-out Japanese and English perplexity for the original, this checkpoint, and "
        "round-to-nearest at the same bits and group size.",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, opts: Options, result: Result) -> None:
    (folder / "README.md").write_text(render_card(opts, result), encoding="utf-8")
    meta = {"base_model": str(opts.model), "method": opts.method, "format": opts.format,
            "group_size": opts.group_size, "observer": opts.observer,
            "calibration": result.calib.source,
            "calibration_samples": len(result.calib.samples),
            "calibration_tokens": result.calib.num_tokens, "seq_len": result.calib.seq_len,
            "llmcompressor": _version("llmcompressor")}
    (folder / "moegi-quantize.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
