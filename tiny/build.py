"""Builds the embedded tiny models and caches them: the default model and the test models.

No hub downloads: every model starts from moegi's own tokenizer (`tokenizer.py`). The models:

- `tiny-chat`: the default model, a 4-bit AWQ MoE made by mergekit-moe from trained experts and
  quantized by moegi (`chat.py`); `tiny-chat-moe` is its bf16 merge before quantization;
- `tiny-text`: a language model for the quantizer's quality checks (`text.py`);
- `tiny-llama`, `tiny-mixtral`: random weights, for tests.

Everything is deterministic (fixed seeds, one sentencepiece thread) and cached under
`$MOEGI_CACHE` (default `~/.cache/moegi`) in a folder whose name carries a fingerprint of the
inputs (code and data, and the models it is built from), so a change rebuilds and an unchanged
tree reuses the cache. A model that needs the quantize environment (llm-compressor, mergekit)
is built there, in `.venv-quantize` or `$MOEGI_QUANTIZE_PYTHON`, whichever environment asks.

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

from tiny import tokenizer
from tiny.tokenizer import build_tokenizer

HERE = Path(__file__).parent
REPO = HERE.parent
QUANTIZE_DIR = REPO / "quantize"
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


@dataclass(frozen=True)
class Builder:
    build: Callable[[Path], None]
    inputs: tuple[Path, ...] = ()  # files whose content the model depends on (besides these)
    needs: tuple[str, ...] = ()  # models it is built from (their fingerprints count)
    quantize_env: bool = False  # needs llm-compressor / mergekit


_TRAIN = (HERE / "train.py", HERE / "instructions.json", HERE / "shapes.py")
# The quantizer's code and data are inputs of the models it makes: a change re-quantizes them.
_QUANTIZER = (*sorted(QUANTIZE_DIR.glob("*.py")), *sorted(QUANTIZE_DIR.glob("*.json")),
              *sorted(QUANTIZE_DIR.glob("data/*.jsonl")))
BUILDERS: dict[str, Builder] = {
    "tiny-llama": Builder(_random("llama"), (HERE / "shapes.py",)),
    "tiny-mixtral": Builder(_random("mixtral"), (HERE / "shapes.py",)),
    "tiny-chat-moe": Builder(_tiny_chat_moe, (*_TRAIN, HERE / "chat.py", HERE / "mergekit-moe.yml"),
                             quantize_env=True),
    "tiny-chat": Builder(_tiny_chat, (HERE / "chat.py", *_QUANTIZER),
                         needs=("tiny-chat-moe",), quantize_env=True),
    "tiny-text": Builder(_tiny_text, (HERE / "text.py", HERE / "shapes.py",
                                      QUANTIZE_DIR / "data" / "calibration.jsonl")),
    # A real pretrained model from a PyPI package, and a mergekit-moe merge of it (real.py).
    # Built in one environment (transformers' GGUF loader differs between 5.17 and 5.19: one
    # names <|im_start|> as EOS, the other <|im_end|>), so every test sees the same files.
    "smollm2": Builder(_smollm2, (HERE / "real.py",), quantize_env=True),
    "smollm2-moe": Builder(_smollm2_moe, (HERE / "real.py",), needs=("smollm2",),
                           quantize_env=True),
    "smollm2-moe-awq": Builder(_smollm2_moe_awq, (HERE / "real.py", *_QUANTIZER),
                               needs=("smollm2-moe",), quantize_env=True),
}
# Built on demand (by the tests that use them), not by `make models`.
ON_DEMAND = ("smollm2", "smollm2-moe", "smollm2-moe-awq")


def fingerprint(name: str) -> str:
    builder = BUILDERS[name]
    h = hashlib.sha256()
    for f in (tokenizer.CORPUS, Path(tokenizer.__file__), Path(__file__), *builder.inputs):
        h.update(f.read_bytes())
    for dep in builder.needs:
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
