"""Unit tests of the quantization parts that need no model: calibration, the streaming shard
writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from quantize import calibration
from quantize.checkpoint import ShardWriter
from tests.quantize.conftest import read_tensors


def test_builtin_calibration_is_japanese_and_english() -> None:
    rows = calibration.read_rows(calibration.BUILTIN)
    texts = [r.get("text") or json.dumps(r["messages"], ensure_ascii=False) for r in rows]
    ja = [t for t in texts if any("\u3040" <= c <= "\u30ff" for c in t)]
    assert len(ja) >= 16 and len(texts) - len(ja) >= 16
    assert sum("messages" in r for r in rows) >= 16
    held = calibration.heldout_texts()
    assert not set(held) & {r.get("text") for r in rows}


def test_bad_calibration_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "x"}\n')
    with pytest.raises(calibration.CalibrationError, match=r"c.jsonl:2: expected"):
        calibration.read_rows(bad)
    bad.write_text("not json\n")
    with pytest.raises(calibration.CalibrationError, match=r"c\.jsonl:1: not JSON"):
        calibration.read_rows(bad)


def test_instruction_rows_use_the_preset_format(tmp_path: Path, tokenizer: Any,
                                                llama_model_dir: Path) -> None:
    # A folder named like a known model picks its moegi preset (shisa-7b: Llama-2-chat).
    model = tmp_path / "shisa-7b-v1"
    shutil.copytree(llama_model_dir, model)
    calib = calibration.load(tokenizer, model, num_samples=200, seq_len=4096)
    assert "llama-2-chat" in calib.prompt_format
    decoded = [tokenizer.decode(s) for s in calib.samples]
    assert any("[INST]" in d for d in decoded)
    plain = calibration.load(tokenizer, llama_model_dir, num_samples=200, seq_len=4096)
    assert plain.prompt_format.startswith("plain text")
    assert not any("[INST]" in tokenizer.decode(s) for s in plain.samples)
    assert max(map(len, calibration.load(tokenizer, model, seq_len=16).samples)) == 16


def test_a_tokenizer_that_leaves_the_gate_no_text_is_refused_before_loading(
        tokenizer: Any, llama_model_dir: Path) -> None:
    # What a sentencepiece vocabulary read as Qwen2's byte-level tokenizer did to Japanese text.
    class OneToken:
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def encode(self, text: str, **_: Any) -> list[int]:
            return [1]

    with pytest.raises(calibration.CalibrationError, match="under 2 tokens"):
        calibration.load(OneToken(), llama_model_dir)
    assert calibration.load(tokenizer, llama_model_dir).heldout  # the real one measures


def test_shard_writer_streams_the_files_safetensors_writes(tmp_path: Path) -> None:
    """The streaming writer holds no tensor, yet its file is save_file's, byte for byte."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b.f16_odd": torch.randn(7, generator=gen).to(torch.float16),
        "c.f32": torch.randn(2, 3, generator=gen),
        "d.qweight": torch.randint(-2**31, 2**31 - 1, (4, 6), generator=gen, dtype=torch.int32),
        "e.i64": torch.arange(5),
        "f.bool": torch.tensor([True, False, True]),
        "g.u8": torch.arange(9, dtype=torch.uint8),
        "h.scalar": torch.tensor(1.5, dtype=torch.float16),
        "i.empty": torch.zeros(0, 4),
        "j.i8": torch.tensor([-3, 4], dtype=torch.int8),
        "k.f64": torch.tensor([1e300, -2.0], dtype=torch.float64),
        "l.i16": torch.tensor([-300, 7], dtype=torch.int16),
        "m.f16": torch.randn(2, 4, generator=gen).to(torch.float16),
    }
    one = tmp_path / "one"
    one.mkdir()
    writer = ShardWriter(one, 1 << 30)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    assert (one / "model.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]  # no data file left

    many = tmp_path / "many"
    many.mkdir()
    writer = ShardWriter(many, 40)
    for name, t in tensors.items():
        writer.add(name, t)
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a.bf16", tensors["a.bf16"])
    writer.close()
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert len(set(index["weight_map"].values())) > 3
    back = read_tensors(many)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with pytest.raises(TypeError, match="complex64"):
        ShardWriter(many, 40).add("z", torch.zeros(2, dtype=torch.complex64))


def test_the_docs_loaders_table_is_the_cards() -> None:
    """One table: the docs' copy is rendered from quantize/loaders.py, as every card's is."""
    from quantize import loaders

    docs = (Path(__file__).resolve().parents[2] / "docs" / "quantize.md").read_text(encoding="utf-8")
    assert loaders.docs_table() in docs
    moe, dense = loaders.card_rows(moe=True), loaders.card_rows(moe=False)
    assert len(moe) == len(dense) == len(loaders.LOADERS) + 2 and moe != dense


def test_options_come_from_flags_and_variables_with_defaults_in_one_place(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """moegi-quantize's options are pydantic settings, as moegi-serve's: a MOEGI_QUANTIZE_*
    variable sets what a flag sets, the flag wins, and a bad value names both."""
    from quantize.cli import parse
    from quantize.options import Options

    monkeypatch.setenv("MOEGI_QUANTIZE_GROUP_SIZE", "64")
    opts = parse(Options, ["m", "o"])
    assert (opts.group_size, opts.method, opts.num_samples) == (64, "gptq", 128)
    assert parse(Options, ["m", "o", "--group-size", "32"]).group_size == 32
    assert Options.model_fields["method"].default == "gptq"  # the one place the default lives
    monkeypatch.setenv("MOEGI_QUANTIZE_NUM_SAMPLES", "0")
    with pytest.raises(SystemExit, match="--num-samples / MOEGI_QUANTIZE_NUM_SAMPLES"):
        parse(Options, ["m", "o"])


def test_gptq_needs_calibration_tokens_enough_for_its_hessians(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from quantize import guard
    from quantize.options import Options
    from quantize.run import _fit_method

    opts = Options(model=tmp_path, out=tmp_path / "out")
    assert opts.method == "gptq"
    enough = guard.GPTQ_TOKENS_PER_INPUT * 1536
    assert _fit_method(opts, enough, 1536).method == "gptq"
    assert capsys.readouterr().err == ""
    fewer = _fit_method(opts, enough - 1, 1536)
    assert fewer.method == "awq" and fewer.out == opts.out
    assert f"at least {enough} tokens" in capsys.readouterr().err
    rtn = opts.model_copy(update={"method": "rtn"})
    assert _fit_method(rtn, 1, 1536) is rtn
