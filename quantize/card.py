"""The model card (`README.md`) written into every quantized checkpoint.

It records what a user needs to trust and run the checkpoint: the quantization table (method,
what each layer kept, bits, group size, zero point, calibration data and length, size on disk,
the gate's figures and the text they were measured on), the prompt format, the loaders, and the
commands for moegi, vLLM, TGI and transformers. `moegi-quantize.json` holds the same as data.
"""

from __future__ import annotations

import json
from collections import Counter
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


# What each guard.py candidate is, in the card's words.
CANDIDATE_NAMES = {"recipe": "AWQ's scales with the observer's ranges",
                   "minmax": "AWQ's scales with min-max ranges",
                   "rtn": "plain round-to-nearest",
                   "recipe+gptq": "AWQ's scales, the observer's ranges and GPTQ's rounding",
                   "rtn+gptq": "min-max ranges and GPTQ's rounding, without AWQ's scales"}


def render_card(opts: Options, result: Result) -> str:
    """The card: a title, then one section per function below."""
    spec = result.spec
    title = [f"# {opts.out.name}", "",
             f"4-bit {METHOD_NAMES[opts.method]} quantization of `{opts.model.name}` "
             f"({spec.architecture}), made with moegi's `moegi-quantize` on llm-compressor "
             f"{_version('llmcompressor')}.", ""]
    return "\n".join([*title, *_quantization(opts, result), *_prompt_format(result),
                      *_loaders(result), *_run_it(opts, result), *_check_it(opts)])


def _quantization(opts: Options, result: Result) -> list[str]:
    """The table of how it was made and checked, and the notes under it."""
    c, spec, gate = result.calib, result.spec, result.gate
    fmt = "AutoAWQ GEMM" if opts.format == "awq-gemm" else "compressed-tensors pack-quantized"
    quant_method = "awq" if opts.format == "awq-gemm" else "compressed-tensors"
    kept = "; ".join(f"{n} of {len(result.choices)}: {CANDIDATE_NAMES[k]}"
                     for k, n in Counter(result.choices).most_common())
    return [
        "## Quantization", "", "| | |", "|---|---|",
        f"| Method | {METHOD_NAMES[opts.method]}, weights only (W4A16) |",
        *([f"| Per layer | {kept} (each layer keeps the candidate with the least output error "
           "on the calibration data) |"] if kept else []),
        f"| Format | {fmt} (`quant_method: {quant_method}`) |",
        "| Bits | 4 |",
        f"| Group size | {opts.group_size} |",
        "| Zero point | yes (asymmetric) |",
        *([f"| Group ranges | `{opts.observer}` observer (llm-compressor) after AWQ scaling, or "
           "min-max, per layer as above |"] if opts.method != "rtn" else []),
        f"| Not quantized | {spec.kept_text} |",
        f"| Calibration data | {c.source} |",
        f"| Calibration samples | {len(c.samples)} sequences, {c.num_tokens} tokens, "
        f"at most {c.seq_len} tokens each |",
        f"| Instruction rows rendered as | {c.prompt_format} |",
        f"| Size on disk | {_size(result.size_bytes)} |",
        f"| Quantized on | {result.device}, {result.seconds:.0f} s, peak RSS "
        f"{result.peak_rss_gb:.1f} GiB |",
        f"| Checked before publishing | against the original on {c.heldout_source}, read back "
        f"from these files: {gate.figures()} |",
        "",
        *([f"**Published on request (`--accept-quality-loss`)**: {gate.explain()}.", ""]
          if gate.verdict() != "pass" else []),
        *([f"Group size: {result.group_note}.", ""] if result.group_note else []),
        *([f"Every expert is calibrated on every calibration token "
           f"(`moe_calibrate_all_experts`). {spec.card_text}", ""] if spec.is_moe else []),
    ]


def _prompt_format(result: Result) -> list[str]:
    fmt = result.calib.prompt_format
    return ["## Prompt format", "",
            f"{fmt}. The template is shipped in this folder's tokenizer files "
            "(`chat_template.jinja` when the original tokenizer had none), so the commands below "
            "apply it to chat requests." if not fmt.startswith("plain text") else
            "No chat template: the original tokenizer has none and no moegi preset matches the "
            "model's name. Serve it with `--chat-template NAME` (or `--preset NAME`) to choose "
            "one.", ""]


def _loaders(result: Result) -> list[str]:
    return ["## Loaders", "",
            "What reads this checkpoint, and what moegi checked (its test suite runs on a CPU; no "
            "GPU, TGI or Docker engine was available there):", "",
            *loaders.card_rows(result.spec.is_moe), ""]


def _run_it(opts: Options, result: Result) -> list[str]:
    name = opts.out.name
    quant_method = "awq" if opts.format == "awq-gemm" else "compressed-tensors"
    return [
        "## Run it", "",
        "moegi (OpenAI-compatible API, EOS truncation, Japanese-safe streaming; on a CPU its vLLM "
        "plugin runs 4-bit MoE experts; vLLM reads the method from config.json and picks its "
        "fastest kernel, Marlin on CUDA, so no `--quantization` flag is needed):", "",
        "```sh", f"moegi-serve --model ./{name}", "```", "",
        "vLLM:", "",
        "```sh",
        f"vllm serve ./{name} --quantization {'awq_marlin' if quant_method == 'awq' else quant_method}",
        "```", "",
        "Text Generation Inference:", "",
        "```sh",
        f"docker run --gpus all -v $PWD/{name}:/model ghcr.io/huggingface/text-generation-inference "
        "--model-id /model --quantize awq" if quant_method == "awq" else
        "# TGI reads the AutoAWQ GEMM format: quantize again with --format awq-gemm",
        "```", "",
        *(["transformers: not for this MoE checkpoint (transformers 5 loads AWQ MoE experts as "
           "missing weights); use vLLM or moegi."] if result.spec.is_moe else [
            "transformers 5, through the `gptqmodel` package (`pip install gptqmodel`):", "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("./{name}", device_map="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("./{name}")',
            "```"]),
        "",
    ]


def _check_it(opts: Options) -> list[str]:
    return ["## Check it", "",
            "```sh", f"moegi-quantize verify ./{opts.out.name} --original {opts.model}", "```", "",
            "prints held-out Japanese and English perplexity for the original, this checkpoint, "
            "and round-to-nearest at the same bits and group size.", ""]


def write_card(folder: Path, opts: Options, result: Result) -> None:
    (folder / "README.md").write_text(render_card(opts, result), encoding="utf-8")
    meta = {"base_model": str(opts.model), "method": opts.method, "format": opts.format,
            "group_size": opts.group_size, "observer": opts.observer,
            "calibration": result.calib.source,
            "calibration_samples": len(result.calib.samples),
            "calibration_tokens": result.calib.num_tokens, "seq_len": result.calib.seq_len,
            "layers_kept": dict(Counter(result.choices)),
            "gate": {"kl": result.gate.kl, "top1": result.gate.top1,
                     "rtn_kl": result.gate.rtn_kl, "rtn_top1": result.gate.rtn_top1,
                     "kl_difference_stderr": result.gate.noise, "verdict": result.gate.verdict(),
                     "text": result.calib.heldout_source},
            "llmcompressor": _version("llmcompressor")}
    (folder / "moegi-quantize.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
