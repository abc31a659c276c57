"""Builds the embedded tiny models and caches them: the default model and the test models.

No hub downloads: every model starts from moegi's own tokenizer (`tokenizer.py`). The models:

- `tiny-chat`: the default model, a 4-bit AWQ MoE made by mergekit-moe from trained experts and
  quantized by moegi (`chat.py`); `tiny-chat-moe` is its bf16 merge before quantization;
- `tiny-text`: a language model for the quantizer's quality checks (`text.py`);
- `tiny-llama`, `tiny-mixtral`: random weights, for tests;
- `smollm2`, `smollm2-moe`, `smollm2-moe-awq`: a real pretrained model and its merges (`real.py`);
- `tiny-qwen2`, `tiny-qwen3`, `tiny-qwen2-moe`, `tiny-qwen3-moe`: the Qwen families (`families.py`).

Everything is deterministic (fixed seeds, one sentencepiece thread) and cached under
`$MOEGI_CACHE` (default `~/.cache/moegi`) in a folder whose name carries a fingerprint of its
inputs (every source file of the packages its build uses, and the models it is built from), so
a change rebuilds and an unchanged tree reuses the cache. A model that needs the quantize
environment (llm-compressor, mergekit) is built there, in `.venv-quantize` or
`$MOEGI_QUANTIZE_PYTHON`, whichever environment asks.

    python -m tiny.build            # builds all, prints their paths
    python -m tiny.build tiny-chat  # builds one
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiny.tokenizer import build_tokenizer

HERE = Path(__file__).parent
REPO = HERE.parent
SEED = 1234


def cache_root() -> Path:
    return Path(os.environ.get("MOEGI_CACHE", Path.home() / ".cache" / "moegi"))


def _random(arch: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM

        from tiny.shapes import llama_config, mixtral_config

        build_tokenizer(out)
        vocab = len(AutoTokenizer.from_pretrained(out))
        torch.manual_seed(SEED)
        model: Any = (LlamaForCausalLM(llama_config(vocab)) if arch == "llama"  # type: ignore[no-untyped-call]
                      else MixtralForCausalLM(mixtral_config(vocab)))  # type: ignore[no-untyped-call]
        model.to(torch.bfloat16).save_pretrained(out)

    return build


def _tiny_chat_moe(out: Path) -> None:
    from tiny.chat import build_merged

    build_merged(out)


def _tiny_chat(out: Path) -> None:
    from tiny.chat import build_quantized

    build_quantized(out, ensure_model("tiny-chat-moe"))


def _tiny_text(out: Path) -> None:
    from tiny.text import train_text_model

    build_tokenizer(out)
    train_text_model(out)


def _smollm2(out: Path) -> None:
    from tiny.real import build_smollm2

    build_smollm2(out, cache_root())


def _smollm2_moe(out: Path) -> None:
    from tiny.real import build_smollm2_moe

    build_smollm2_moe(out, ensure_model("smollm2"))


def _smollm2_moe_awq(out: Path) -> None:
    from tiny.real import build_awq

    build_awq(out, ensure_model("smollm2-moe"))


def _dense(family: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from tiny.families import random_dense

        random_dense(out, family)

    return build


def _merge(name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from tiny.families import merged

        merged(out, name)

    return build


@dataclass(frozen=True)
class Builder:
    build: Callable[[Path], None]
    # The project packages whose sources (code and data) the model depends on: every package its
    # build imports or runs (tests/tiny/test_fingerprint.py checks that against the imports).
    packages: tuple[str, ...] = ("tiny", "chat_templates")
    needs: tuple[str, ...] = ()  # models it is built from (their fingerprints count)
    quantize_env: bool = False  # needs llm-compressor / mergekit


# A model that moegi-quantize makes depends on the quantizer, and on the AWQ layout and registry.
_QUANTIZED = ("tiny", "chat_templates", "quantize", "awq")
SOURCE_SUFFIXES = (".py", ".json", ".jsonl", ".yml", ".txt", ".jinja")
BUILDERS: dict[str, Builder] = {
    "tiny-llama": Builder(_random("llama")),
    "tiny-mixtral": Builder(_random("mixtral")),
    "tiny-chat-moe": Builder(_tiny_chat_moe, quantize_env=True),
    "tiny-chat": Builder(_tiny_chat, _QUANTIZED, needs=("tiny-chat-moe",), quantize_env=True),
    # Trained on the quantizer's built-in calibration text (tiny/text.py reads it).
    "tiny-text": Builder(_tiny_text, _QUANTIZED),
    # A real pretrained model from a PyPI package, and a mergekit-moe merge of it (real.py).
    # Built in one environment (transformers' GGUF loader differs between 5.17 and 5.19: one
    # names <|im_start|> as EOS, the other <|im_end|>), so every test sees the same files.
    "smollm2": Builder(_smollm2, quantize_env=True),
    "smollm2-moe": Builder(_smollm2_moe, needs=("smollm2",), quantize_env=True),
    "smollm2-moe-awq": Builder(_smollm2_moe_awq, _QUANTIZED, needs=("smollm2-moe",),
                               quantize_env=True),
    # The other families users bring (families.py): dense Qwen2 / Qwen3 with random weights, and
    # the Qwen2-MoE (shared expert) and Qwen3-MoE merges mergekit-moe writes.
    "tiny-qwen2": Builder(_dense("qwen2")),
    "tiny-qwen3": Builder(_dense("qwen3")),
    "tiny-qwen2-moe": Builder(_merge("tiny-qwen2-moe"), quantize_env=True),
    "tiny-qwen3-moe": Builder(_merge("tiny-qwen3-moe"), quantize_env=True),
}
# Built on demand (by the tests that use them), not by `make models`.
ON_DEMAND = ("smollm2", "smollm2-moe", "smollm2-moe-awq", "tiny-qwen2", "tiny-qwen3",
             "tiny-qwen2-moe", "tiny-qwen3-moe")


def sources(name: str) -> list[Path]:
    """The files a model's fingerprint covers: every source file of its packages."""
    return sorted(f for pkg in BUILDERS[name].packages for f in (REPO / pkg).rglob("*")
                  if f.suffix in SOURCE_SUFFIXES and "__pycache__" not in f.parts)


def fingerprint(name: str) -> str:
    h = hashlib.sha256()
    for f in sources(name):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    for dep in BUILDERS[name].needs:
        h.update(fingerprint(dep).encode())
    return h.hexdigest()[:12]


def quantize_python() -> Path:
    """The quantize environment's interpreter (`$MOEGI_QUANTIZE_PYTHON`, else `.venv-quantize`)."""
    return Path(os.environ.get("MOEGI_QUANTIZE_PYTHON", REPO / ".venv-quantize" / "bin" / "python"))


def _in_quantize_env(name: str) -> None:
    python = quantize_python()
    if not python.exists():
        raise SystemExit(f"building {name} needs the quantize environment (llm-compressor, "
                         f"mergekit), and {python} is missing: run `make quantize-env`, or set "
                         "MOEGI_QUANTIZE_PYTHON to a Python that has moegi[quantize]")
    subprocess.run([str(python), "-m", "tiny.build", name], check=True,
                   stdout=sys.stderr)  # our stdout prints paths only


def ensure_model(name: str) -> Path:
    """Return the cached model folder for `name`, building it first if it is missing."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown tiny model {name!r}; choose one of {sorted(BUILDERS)}")
    builder = BUILDERS[name]
    out = cache_root() / "models" / f"{name}-{fingerprint(name)}"
    if (out / "config.json").exists():
        return out
    if builder.quantize_env and importlib.util.find_spec("llmcompressor") is None:
        _in_quantize_env(name)
        if not (out / "config.json").exists():
            raise SystemExit(f"the quantize environment did not build {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder per model at a time (test sessions and `make serve` may race on a cold cache).
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out
        # Build beside the target, rename at the end: an interrupted build never looks complete.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
        try:
            builder.build(tmp)
            (tmp / "moegi-tiny.json").write_text(json.dumps({"name": name}))
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from a container's other user
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or [
        n for n in BUILDERS if n not in ON_DEMAND]
    for name in names:
        print(ensure_model(name))


if __name__ == "__main__":
    main()
