"""Writes an AutoAWQ GEMM checkpoint folder from llm-compressor's compressed-tensors output.

Tensors stream one linear layer at a time from the compressed shards to sharded safetensors
(original tensor names plus `.qweight`/`.qzeros`/`.scales`), so a 4x7B MoE never needs its
whole state in memory. Then `config.json` gets the AWQ `quantization_config`, and the tokenizer,
chat template and generation config are copied from the original model.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from awq.compressed import ct_integers, from_compressed
from awq.layout import dequantize, unpack_gemm
from awq.registry import ArchSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


QUANT_LEAVES = frozenset({"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"})


class RepackError(AssertionError):
    """The GEMM files do not say what llm-compressor computed."""


@dataclass
class WriteReport:
    inexact_scales: int = 0


@dataclass
class PackedLinear:
    """One quantized linear layer as llm-compressor saved it (pack-quantized)."""

    name: str  # llm-compressor's module name
    packed: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    shape: tuple[int, int]  # (out, in)


def ct_entries(ct_dir: Path) -> Iterator[tuple[str, torch.Tensor] | PackedLinear]:
    """Every tensor of a compressed-tensors folder, streamed; the four tensors of a quantized
    linear come together as one `PackedLinear`, the others as (name, tensor)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(ct_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                prefix, _, leaf = key.rpartition(".")
                if leaf not in QUANT_LEAVES:
                    yield key, f.get_tensor(key)
                    continue
                got = parts.setdefault(prefix, {})
                got[leaf] = f.get_tensor(key)
                if len(got) == len(QUANT_LEAVES):
                    del parts[prefix]
                    out_f, in_f = (int(x) for x in got["weight_shape"].tolist())
                    yield PackedLinear(prefix, got["weight_packed"], got["weight_scale"],
                                       got["weight_zero_point"], (out_f, in_f))
    if parts:
        raise RuntimeError(f"incomplete quantized tensors for {sorted(parts)[:3]}")


class Shards:
    """A checkpoint folder's tensors by name; each is read from its shard when asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, Path] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    self.where[key] = shard
        if not self.where:
            raise FileNotFoundError(f"{folder} holds no .safetensors files")

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.where[name]), "pt") as f:
            tensor: torch.Tensor = f.get_tensor(name)
        return tensor

    def under(self, prefix: str) -> Iterator[str]:
        return (k for k in self.where if k.startswith(prefix))


# safetensors' names for the dtypes a checkpoint holds, in the order of the library's own Dtype
# enum: a shard lists its tensors from the last of these to the first (widest first), as the
# library's writer does, so each starts aligned.
_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
              torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
_ST_RANK = {name: rank for rank, name in enumerate(_ST_DTYPES.values())}
_COPY_CHUNK = 16 << 20


@dataclass
class _Entry:
    dtype: str
    shape: list[int]
    offset: int  # in the shard's data file
    nbytes: int


class ShardWriter:
    """Streams tensors into `model-0000i-of-0000n.safetensors` files of at most `max_bytes`,
    holding no tensor once `add` returns.

    Written by hand because the safetensors library writes a file only from a dict of tensors
    in memory (and huggingface_hub's shard splitter needs the whole state dict first): a shard
    held that way, plus the heap fragmentation of many 1-4 MiB tensors, was 36 MiB of memory
    per layer of the bench model. Here each tensor's bytes go to the shard's data file as they
    come; closing a shard writes the safetensors header (format: 8-byte little-endian length,
    JSON, then the bytes) and copies the data behind it in the order the library itself uses
    (by dtype, widest first, then by name): the files are byte for byte what `save_file` writes
    (tests/quantize/test_units.py), and `check_repack` reads every one back through safetensors.
    """

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0
        self._written: set[str] = set()
        self._entries: dict[str, _Entry] = {}
        self._size = 0
        self._data: BinaryIO | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: cannot store {tensor.dtype} in safetensors")
        if name in self._written:
            raise ValueError(f"{name} written twice")
        self._written.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._size + size > self.max_bytes:
            self._flush()
        if self._data is None:
            self._data = (self.out / f".shard-{len(self.files):05d}.data").open("w+b")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._data.write(raw.data)
        self._entries[name] = _Entry(_ST_DTYPES[tensor.dtype], list(tensor.shape), self._size,
                                     size)
        self._size += size
        self.total += size

    def _flush(self) -> None:
        data = self._data
        assert data is not None
        order = sorted(self._entries.items(), key=lambda kv: (-_ST_RANK[kv[1].dtype], kv[0]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for name, e in order:
            header[name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [pos, pos + e.nbytes]}
            pos += e.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the library pads
        tmp = f"shard-{len(self.files):05d}.safetensors"
        with (self.out / tmp).open("wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, e in order:
                data.seek(e.offset)
                left = e.nbytes
                while left:
                    chunk = data.read(min(left, _COPY_CHUNK))
                    f.write(chunk)
                    left -= len(chunk)
        data.close()
        Path(data.name).unlink()
        self.files.append((tmp, sorted(self._entries)))
        self._entries, self._size, self._data = {}, 0, None

    def close(self) -> None:
        if self._entries:
            self._flush()
        if len(self.files) == 1:
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return
        weight_map = {}
        n = len(self.files)
        for i, (tmp, names) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def awq_config(spec: ArchSpec, group_size: int) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": list(spec.modules_to_not_convert)
            if spec.modules_to_not_convert else None}


def write_gemm(ct_dir: Path, out: Path, spec: ArchSpec, group_size: int,
               max_shard_bytes: int = 4 << 30, progress: Any = None) -> WriteReport:
    """Repack every quantized linear of `ct_dir` into `out` (an existing, empty folder)."""
    report = WriteReport()
    writer = ShardWriter(out, max_shard_bytes)
    layer_seen = -1
    for entry in ct_entries(ct_dir):
        if isinstance(entry, PackedLinear):
            g = from_compressed(entry.packed, entry.scale, entry.zero_point, entry.shape)
            name = spec.original_name(entry.name)
            writer.add(f"{name}.qweight", g.qweight)
            writer.add(f"{name}.qzeros", g.qzeros)
            writer.add(f"{name}.scales", g.scales)
            report.inexact_scales += g.inexact_scales
            m = _LAYER.search(entry.name)
            if progress is not None and m and int(m.group(1)) != layer_seen:
                layer_seen = int(m.group(1))
                progress.update(1)
        else:
            key, tensor = entry
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float16)  # AWQ GEMM checkpoints are fp16 throughout
            writer.add(spec.original_name(key), tensor)
    writer.close()
    config = json.loads((ct_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["quantization_config"] = awq_config(spec, group_size)
    config["torch_dtype"] = "float16"  # what older readers (TGI, transformers 4) look at
    config["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return report


def check_repack(ct_dir: Path, gemm_dir: Path, spec: ArchSpec) -> int:
    """Compare every quantized layer with llm-compressor's, bit for bit; return how many.

    The GEMM tensors must unpack to compressed-tensors' integers and zero points, and
    dequantize to exactly its fake-quantized weights (in the model's dtype).
    """
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    written = Shards(gemm_dir)  # one tensor at a time: the output may be larger than memory
    checked = 0
    for layer in ct_entries(ct_dir):
        if not isinstance(layer, PackedLinear):
            continue
        scale = layer.scale
        q, z = ct_integers(layer.packed, layer.zero_point, layer.shape, scale.shape[1])
        name = spec.original_name(layer.name)
        qweight, qzeros, scales = (written.get(f"{name}.{s}") for s in ("qweight", "qzeros",
                                                                           "scales"))
        if not torch.equal(unpack_gemm(qweight).t(), q.to(torch.int32) + 8):
            raise RepackError(f"{name}: repacked weights differ from llm-compressor's")
        if not torch.equal(unpack_gemm(qzeros).t(), z.to(torch.int32) + 8):
            raise RepackError(f"{name}: repacked zero points differ from llm-compressor's")
        group = layer.shape[1] // scale.shape[1]
        args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                                group_size=group)
        theirs = ct_dequantize(q.to(scale.dtype), scale, z.to(scale.dtype), args)
        ours = dequantize((qweight, qzeros, scales)).to(scale.dtype)
        if not torch.equal(ours, theirs):
            bad = int((ours != theirs).sum())
            raise RepackError(f"{name}: {bad} dequantized weights differ from llm-compressor's")
        checked += 1
    if checked == 0:
        raise RepackError(f"{ct_dir} holds no quantized layers")
    return checked


def copy_tokenizer(model_dir: Path, out: Path, template_source: str | None) -> None:
    """Tokenizer files and generation config from the original; the chat template if absent."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    tok_cfg = out / "tokenizer_config.json"
    has_template = (out / "chat_template.jinja").exists() or (
        tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text()))
    if template_source and not has_template:
        # The preset's format travels with the checkpoint, so vLLM / TGI / transformers apply it.
        (out / "chat_template.jinja").write_text(template_source, encoding="utf-8")
    if not (out / "generation_config.json").exists():
        config = json.loads((model_dir / "config.json").read_text())
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
