"""Every MoE layout a merge produces quantizes into the layout vLLM's AutoAWQ MoE loader reads.

- a real `mergekit-moe` merge (fused experts, `mlp.experts.gate_up_proj`, as mergekit 0.1.5
  writes it under transformers 5), straight from the tool;
- the default model's merge after tuning (`tiny-chat-moe`), which must also pass `verify`;
- the classic per-expert names (`block_sparse_moe.experts.E.w1/w2/w3`: Swallow-MoE-4x7B,
  checkpoints saved by transformers 4), made from the same weights, which must quantize the same.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from quantize import verify
from quantize.cli import main as cli
from quantize.layerwise import LayerwiseLM
from tests.quantize.conftest import read_tensors
from tiny.build import ensure_model

MERGE = """base_model: ./e0
gate_mode: random
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: ./e0
    positive_prompts: []
  - source_model: ./e1
    positive_prompts: []
  - source_model: ./e2
    positive_prompts: []
"""


def vllm_layout_ok(out: Path, layers: int, experts: int) -> None:
    """The names vLLM's Mixtral loader maps (block_sparse_moe.gate, experts.E.w1/w2/w3)."""
    names = set(read_tensors(out))
    for i in range(layers):
        assert f"model.layers.{i}.block_sparse_moe.gate.weight" in names
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                for part in ("qweight", "qzeros", "scales"):
                    assert f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.{part}" in names
    assert not any(".mlp." in n or "gate_up_proj" in n for n in names), sorted(names)[:10]


@pytest.fixture(scope="module")
def mergekit_merge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("mergekit")
    base = ensure_model("tiny-llama")
    for i in range(3):  # three experts: the same architecture, different weights
        expert = work / f"e{i}"
        shutil.copytree(base, expert)
        tensors = read_tensors(expert)
        gen = torch.Generator().manual_seed(i)
        tensors = {k: v + 0.02 * torch.randn(v.shape, generator=gen).to(v.dtype)
                   if "mlp" in k else v for k, v in tensors.items()}
        for f in expert.glob("*.safetensors"):
            f.unlink()
        save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
    (work / "moe.yml").write_text(MERGE)
    tool = Path(sys.executable).with_name("mergekit-moe")
    subprocess.run([str(tool), "moe.yml", "merged", "--random-seed", "0", "--quiet"],
                   cwd=work, check=True)
    return work / "merged"


def test_a_mergekit_moe_merge_quantizes_into_vllms_layout(mergekit_merge: Path,
                                                          tmp_path: Path) -> None:
    assert any("mlp.experts.gate_up_proj" in n for n in read_tensors(mergekit_merge))
    out = tmp_path / "awq"
    # 0.1 MiB shards: llm-compressor's save and the repack both write many files, and the
    # fused experts' names are restored shard by shard.
    # Experts from random weights: the gate's verdict is noise, accepted (trained: below).
    assert cli([str(mergekit_merge), str(out), "--num-samples", "8", "--accept-quality-loss",
                "--max-shard-gb", str(0.1 / 1024)]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    vllm_layout_ok(out, layers=2, experts=3)
    # Read back through transformers' own modules (strict loading): close to the original.
    seqs = [[1, 283, 332, 402, 388, 324, 10, 20, 30]]
    kl, _ = verify.compare(LayerwiseLM(mergekit_merge).logits(seqs), LayerwiseLM(out).logits(seqs))
    assert kl < 0.01


def _classic(fused: Path, dest: Path) -> Path:
    """The same model saved under per-expert names, as transformers 4 and older merges do."""
    shutil.copytree(fused, dest)
    tensors = read_tensors(dest)
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.w3.weight"] = t[e, inter:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = t[e].clone()
        else:
            out[key.replace("mlp.gate.", "block_sparse_moe.gate.")] = t
    for f in dest.glob("*.safetensors"):
        f.unlink()
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def tuned_merge_awq(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("tuned") / "awq"
    assert cli(["tiny-chat-moe", str(out), "--num-samples", "32"]) == 0
    return out, json.loads((out / "config.json").read_text())


def test_the_tuned_merge_passes_verify(tuned_merge_awq: tuple[Path, Any], capsys: Any,
                                       tmp_path: Path) -> None:
    """On the conversations it was tuned on: a memorising chat model is unsure of general
    text, where top-1 agreement measures noise rather than the quantization."""
    out, config = tuned_merge_awq
    vllm_layout_ok(out, config["num_hidden_layers"], config["num_local_experts"])
    from tiny.train import PAIRS

    eval_file = tmp_path / "dialogues.jsonl"
    eval_file.write_text("".join(json.dumps({"text": f"### 指示:\n{q}\n### 応答:\n{a}"},
                                            ensure_ascii=False) + "\n" for q, a in PAIRS),
                         encoding="utf-8")
    report = verify.verify(out, ensure_model("tiny-chat-moe"), eval_file)
    with capsys.disabled():
        print("\ntiny-chat-moe (mergekit-moe merge, tuned):\n" + report.table())
    assert report.kl <= verify.MAX_MEAN_KL and report.top1 >= verify.MIN_TOP1


def test_classic_names_quantize_to_the_same_checkpoint(tuned_merge_awq: tuple[Path, Any],
                                                       tmp_path: Path) -> None:
    fused_out, _ = tuned_merge_awq
    classic = _classic(ensure_model("tiny-chat-moe"), tmp_path / "classic")
    out = tmp_path / "awq"
    assert cli([str(classic), str(out), "--num-samples", "32"]) == 0
    a, b = read_tensors(fused_out), read_tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the two layouts quantized differently"
