"""The default model is a 4-bit AWQ MoE that moegi merged and quantized, served through vLLM.

tiny-chat is built as tiny/chat.py says: experts -> mergekit-moe -> tuning -> moegi-quantize.
On a CPU without AMX vLLM has no WNA16 MoE kernel; moegi's plugin (vllm_plugins/awq_cpu.py) runs
the experts, and the integration servers run that path on every host. The memorised replies
(chat, stream, EOS truncation, Japanese) are checked in test_server.py against this same
server; here: what was served, that the plugin ran inside vLLM's engine process, and that vLLM's
greedy tokens agree with a reference forward.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.integration.conftest import Server, agreement
from tiny.build import ensure_model

pytestmark = pytest.mark.integration

# Prompts the model never trained on: held-out text, and chats outside its memorised set.
UNSEEN = [
    "東京の天気はどうですか？", "What is your name?", "北海道について教えてください。",
    "[INST] 好きな食べ物は？ [/INST]", "Tell me about Kyoto in spring.",
    "### 指示:\n日本で一番長い川は？\n### 応答:\n",
]


def test_the_default_model_is_a_4bit_awq_moe_from_mergekit() -> None:
    ckpt = ensure_model("tiny-chat")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"], qc["version"]) == (
        "awq", 4, 128, True, "gemm")
    assert "gate_mode: random" in (ckpt / "mergekit-moe.yml").read_text()
    assert (ckpt / "moegi-quantize.json").is_file()


def test_the_plugin_runs_the_experts_in_vllms_engine_process(chat_server: Server) -> None:
    """moegi's plugin runs every MoE layer and the dense 4-bit linears on its native kernels, as
    on a CPU without AMX (the integration servers run that path on every host: conftest's
    SERVER_ENV); the repack lines come after loading, when only moegi's kernel can read the
    layers, so they say which kernel runs."""
    log = chat_server.log.read_text(errors="replace")
    # vLLM prefixes what its engine-core and worker processes log with their name and pid.
    lines = re.findall(r"\((?:Worker|EngineCore)[^)]*pid=\d+\).*moegi: 4-bit AWQ experts of "
                       r"(model\.layers\.\d+\.block_sparse_moe\.experts) run on moegi's CPU kernel "
                       r"\(native, ", log)
    layers = json.loads((ensure_model("tiny-chat") / "config.json").read_text())["num_hidden_layers"]
    assert sorted(set(lines)) == [f"model.layers.{i}.block_sparse_moe.experts"
                                  for i in range(layers)], log[-3000:]
    assert re.search(r"\(Worker[^)]*\).*moegi: 4-bit AWQ experts repacked for moegi's native MoE "
                     r"kernel", log), log[-3000:]
    assert re.search(r"\(Worker[^)]*\).*moegi: dense 4-bit AWQ linears repacked for moegi's "
                     r"native kernel", log), log[-3000:]
    assert "No WNA16 MoE backend" not in log and "Using CPUExpertsInt4" not in log
    # moegi's CPU default for this float16 (AutoAWQ) checkpoint: bfloat16 (serve/cli.py).
    assert "dtype=torch.bfloat16" in log and "float16 checkpoint served in bfloat16" in log
    # Compiled, as `make serve` runs it: torch.compile traced the model around the plugin's op.
    assert "enforce_eager=False" in log and "Warming up model for the compilation" in log


def test_greedy_tokens_agree_with_the_reference_forward(chat_server: Server) -> None:
    """vLLM (bfloat16, moegi's CPU default) vs the reference forward `verify` uses (the checkpoint's
    files dequantized into transformers' float32 modules, layer by layer), on prompts the model
    never saw.

    Teacher-forced on vLLM's own tokens: at every generated position the reference's top-1
    token must be vLLM's. 100% means the greedy sequences are identical.
    """
    from transformers import AutoTokenizer

    from quantize.calibration import heldout_texts

    ckpt = ensure_model("tiny-chat")
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = [tok.encode(text)[:cut] for text in [*heldout_texts(), *UNSEEN] for cut in (8, 20)]
    agree, total = agreement(chat_server, "tiny-chat", ckpt, prompts, 24)
    print(f"\ntop-1 agreement, vLLM vs reference forward: {agree}/{total} = {agree / total:.2%}")
    assert total >= 600
    assert agree / total >= 0.99
