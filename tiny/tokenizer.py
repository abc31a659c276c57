"""The tiny models' tokenizers, trained here on `corpus.txt` (Japanese and English text shipped
here), one of each kind the families use:

- `build_tokenizer`: byte-fallback BPE, the Llama-2 / Swallow kind, trained with sentencepiece
  (`<unk>`, `<s>`, `</s>` at ids 0, 1, 2), wrapped as a transformers `LlamaTokenizer`.
  Deterministic (one sentencepiece thread), so an unchanged tree rebuilds the same files.
- `build_qwen_tokenizer`: byte-level BPE, the Qwen kind, trained with `tokenizers` and saved as
  a `Qwen2Tokenizer`. A dense Qwen2 model must have one: transformers 5 loads every `qwen2`
  checkpoint's tokenizer as `Qwen2Tokenizer` whatever its `tokenizer_config.json` names
  (`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`), which read a sentencepiece vocabulary through
  Qwen's byte-level pre-tokenizer and dropped every Japanese character.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tiny.shapes import VOCAB_SIZE

CORPUS = Path(__file__).with_name("corpus.txt")


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


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_qwen_tokenizer(out: Path) -> None:
    """Train a byte-level BPE of VOCAB_SIZE entries and save it as a `Qwen2Tokenizer`, with Qwen's
    special tokens (`<|endoftext|>` is its end of text, as in Qwen2's base models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(CORPUS)], trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(QWEN_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    # Pairs, as the `tokenizers` BPE takes them (transformers' hint says strings).
    merges: Any = [tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tok.save_pretrained(out)
