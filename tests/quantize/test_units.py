"""Unit tests of the quantization parts that need no model: GEMM packing, mappings, calibration,
the streaming shard writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from quantize import calibration, gemm, mappings
from quantize.checkpoint import ShardWriter, read_tensors


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ 0.2.9's WQLinear_GEMM packing loop, transcribed as the reference."""
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i, o in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            qweight[:, col] |= intweight[:, col * 8 + o].to(torch.int32) << (i * 4)
    return qweight


def test_pack_matches_autoawq_and_round_trips() -> None:
    values = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(0))
    packed = gemm.pack_gemm(values)
    assert packed.dtype == torch.int32 and packed.shape == (16, 8)
    assert torch.equal(packed, autoawq_pack(values))
    assert torch.equal(gemm.unpack_gemm(packed), values.to(torch.int32))


def test_pack_rejects_bad_shapes_and_ranges() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        gemm.pack_gemm(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"0\.\.15"):
        gemm.pack_gemm(torch.full((2, 8), 16))


def test_dequantize_formula() -> None:
    # w[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o], here with 2 groups of 4 inputs.
    q = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(1))
    z = torch.tensor([[3] * 8, [12] * 8])
    s = torch.tensor([[0.5] * 8, [0.25] * 8], dtype=torch.float16)
    w = gemm.dequantize((gemm.pack_gemm(q), gemm.pack_gemm(z), s))
    expect = torch.cat([(q[:4] - 3) * 0.5, (q[4:] - 12) * 0.25]).t()
    assert torch.equal(w, expect.float())


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(mappings.UnsupportedArchitecture) as err:
        mappings.lookup("GPT2LMHeadModel")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"):
        assert arch in str(err.value)


def test_mixtral_router_is_compensated_but_never_quantized() -> None:
    spec = mappings.lookup("MixtralForCausalLM")
    post = dict(spec.mappings)["re:.*post_attention_layernorm$"]
    assert any("mlp\\.gate$" in b for b in post)
    assert any("gate_proj" in b for b in post) and any("up_proj" in b for b in post)
    assert "re:.*mlp\\.gate$" in spec.ignore and "lm_head" in spec.ignore
    assert spec.modules_to_not_convert == ("gate",)
    name = "model.layers.3.block_sparse_moe.experts.7.{}"
    assert spec.original_name(name.format("gate_proj")) == name.format("w1")
    assert spec.original_name(name.format("up_proj")) == name.format("w3")
    assert spec.original_name(name.format("down_proj")) == name.format("w2")


def test_dense_models_keep_gate_proj_quantized() -> None:
    for arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        spec = mappings.lookup(arch)
        # "gate" in modules_to_not_convert would also skip a dense model's gate_proj.
        assert spec.modules_to_not_convert is None
        assert spec.ignore == ("lm_head",)
        assert spec.original_name("model.layers.0.mlp.gate_proj") == "model.layers.0.mlp.gate_proj"


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
