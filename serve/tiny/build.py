"""Builds the embedded tiny models: a byte-fallback tokenizer and tiny Llama / Mixtral checkpoints.

No hub downloads: the tokenizer is trained with sentencepiece on `corpus.txt` (Japanese and
English text shipped here), the Llama-2 / Swallow kind (BPE, byte fallback, `<unk>`, `<s>`,
`</s>` at ids 0, 1, 2), and wrapped as a transformers `LlamaTokenizer`. Models are random
(`tiny-llama`, `tiny-mixtral`) or trained (`tiny-chat`, see `train.py`).

Everything is deterministic (fixed seeds, one sentencepiece thread) and cached under
`$MOEGI_CACHE` (default `~/.cache/moegi`) in a folder whose name carries a fingerprint of the
inputs, so a change to this file or the corpus rebuilds and an unchanged tree reuses the cache.

    python -m serve.tiny.build            # builds all, prints their paths
    python -m serve.tiny.build tiny-chat  # builds one
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantize.calibration import BUILTIN as CALIBRATION  # tiny-text trains on it

HERE = Path(__file__).parent
CORPUS = HERE / "corpus.txt"
VOCAB_SIZE = 600
SEED = 1234

# The shapes are the field notes' tiny shapes; 128/256 are multiples of the AWQ group size (128)
# so the same checkpoints feed the quantizer's tests.
COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2)


def cache_root() -> Path:
    return Path(os.environ.get("MOEGI_CACHE", Path.home() / ".cache" / "moegi"))


def _fingerprint(*files: Path) -> str:
    h = hashlib.sha256()
    for f in (CORPUS, Path(__file__), *files):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_tokenizer(out: Path) -> None:
    """Train a byte-fallback BPE sentencepiece model and save it as a transformers tokenizer."""
    import sentencepiece as spm
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "sp")
        spm.SentencePieceTrainer.train(
            input=str(CORPUS),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            byte_fallback=True,
            character_coverage=0.9995,
            hard_vocab_limit=False,
            split_digits=True,
            add_dummy_prefix=False,  # with add_prefix_space=False below: text concatenates
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,  # determinism: multi-threaded training may order ties differently
            seed_sentencepiece_size=100000,
            minloglevel=2,
        )
        spec: Any = SentencePieceExtractor(prefix + ".model").extract(BPE)
    # add_bos_token as in the Llama-2 tokenizer: encode() starts with <s>.
    tok = LlamaTokenizer(vocab=spec["vocab"], merges=spec["merges"], add_bos_token=True,
                         add_prefix_space=False)
    tok.save_pretrained(out)


def _save_model(out: Path, arch: str) -> None:
    import torch
    from transformers import AutoTokenizer as _AT
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        PreTrainedTokenizerBase,
    )

    tok: PreTrainedTokenizerBase = _AT.from_pretrained(out)
    torch.manual_seed(SEED)
    model: Any
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **COMMON))  # type: ignore[no-untyped-call, arg-type]
    else:
        model = MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), **COMMON, **MIXTRAL))  # type: ignore[no-untyped-call, arg-type]
    model.to(torch.bfloat16).save_pretrained(out)


def _tiny(arch: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        build_tokenizer(out)
        _save_model(out, arch)

    return build


def _tiny_chat(out: Path) -> None:
    from serve.tiny.train import train_chat_model

    build_tokenizer(out)
    train_chat_model(out)


def _tiny_text(out: Path) -> None:
    from serve.tiny.text import train_text_model

    build_tokenizer(out)
    train_text_model(out)


BUILDERS: dict[str, tuple[Callable[[Path], None], tuple[Path, ...]]] = {
    "tiny-llama": (_tiny("llama"), ()),
    "tiny-mixtral": (_tiny("mixtral"), ()),
    "tiny-chat": (_tiny_chat, (HERE / "train.py", HERE / "instructions.json")),
    "tiny-text": (_tiny_text, (HERE / "text.py", CALIBRATION)),
}


def ensure_model(name: str) -> Path:
    """Return the cached model folder for `name`, building it first if it is missing."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown tiny model {name!r}; choose one of {sorted(BUILDERS)}")
    build, extra = BUILDERS[name]
    out = cache_root() / "models" / f"{name}-{_fingerprint(*extra)}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename at the end so an interrupted build never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        build(tmp)
        (tmp / "moegi-tiny.json").write_text(json.dumps({"name": name}))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(BUILDERS)
    for name in names:
        print(ensure_model(name))


if __name__ == "__main__":
    main()
