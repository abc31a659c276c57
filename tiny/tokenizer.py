"""The tiny models' tokenizer: byte-fallback BPE trained here, the Llama-2 / Swallow kind.

Trained with sentencepiece on `corpus.txt` (Japanese and English text shipped here): BPE, byte
fallback, `<unk>`, `<s>`, `</s>` at ids 0, 1, 2, wrapped as a transformers `LlamaTokenizer`.
Deterministic (one sentencepiece thread), so an unchanged tree rebuilds the same files.
"""

from __future__ import annotations

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
