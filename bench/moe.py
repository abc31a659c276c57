"""`make bench-moe`: the 4-bit AWQ MoE on this CPU (moegi's vLLM plugin) against the same MoE in bf16.

One Mixtral large enough for the figures to mean something (hidden 1024, 8 layers, 8 experts,
2 per token, random bf16 weights), served by moegi on vLLM:

- bf16: vLLM's own unquantized CPU MoE kernel (`cpu_fused_moe`);
- AWQ 4-bit GEMM (group 128, zero point): moegi's CPU plugin (`serve/vllm_plugin.py`);
- reference point: a dense Llama of the same total size, 4-bit, through vLLM's dense CPU AWQ
  kernel (`CPUWNA16LinearKernel`).

The 4-bit checkpoints are written by `moegi-quantize --method rtn`: the same AutoAWQ GEMM
files an AWQ run writes (AWQ only chooses other scales), without the calibration forward, which
would take most of the benchmark's time on 2 cores. Every figure is a ratio against the bf16
MoE measured in the same invocation, rounds alternating between the servers; the engine's
resident memory is that of vLLM's engine processes (the server's children), and it is also
given above the engine of a tiny model (the runtime's own floor, measured here too).

    make bench-moe                       # or: .venv/bin/python -m bench.moe [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    ServerProcess,
    concurrent,
    decode_rate,
    free_port,
    realtime,
    spread,
    table,
)
from serve.tiny.build import cache_root, ensure_model, quantize_python

SHAPE: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False)
EXPERTS, PER_TOKEN = 8, 2
PROMPT = "日本の首都はどこですか？東京について、歴史と文化と食べ物を詳しく説明してください。"
DECODE_TOKENS = 96


def _models(root: Path) -> dict[str, Path]:
    """bf16 MoE, its 4-bit checkpoint, and an equal-size dense 4-bit Llama (cached)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    tokenizer = ensure_model("tiny-llama")
    paths = {"bf16 MoE": root / "moe-bf16", "AWQ 4-bit MoE": root / "moe-awq",
             "AWQ 4-bit dense (reference)": root / "dense-awq"}
    dense_bf16 = root / "dense-bf16"
    vocab = 600
    builds: list[tuple[Path, Callable[[], Any]]] = [
        (paths["bf16 MoE"], lambda: MixtralForCausalLM(MixtralConfig(  # type: ignore[no-untyped-call]
            vocab_size=vocab, num_local_experts=EXPERTS, num_experts_per_tok=PER_TOKEN, **SHAPE))),
        # Same total weights: every expert's MLP side by side in one dense MLP.
        (dense_bf16, lambda: LlamaForCausalLM(LlamaConfig(  # type: ignore[no-untyped-call]
            vocab_size=vocab, **{**SHAPE, "intermediate_size": EXPERTS * SHAPE["intermediate_size"]}))),
    ]
    for out, make in builds:
        if (out / "config.json").exists():
            continue
        torch.manual_seed(0)
        model = make()
        model.to(torch.bfloat16).save_pretrained(out)
        for f in tokenizer.glob("tokenizer*"):
            shutil.copy(f, out / f.name)
        del model
    for src, dst in ((paths["bf16 MoE"], paths["AWQ 4-bit MoE"]),
                     (dense_bf16, paths["AWQ 4-bit dense (reference)"])):
        if not (dst / "config.json").exists():
            subprocess.run([str(quantize_python()), "-m", "quantize", str(src), str(dst),
                            "--method", "rtn", "--num-samples", "4", "--overwrite"], check=True,
                           cwd=REPO, stdout=sys.stderr)
    return paths


def _serve(name: str, model: Path, log_dir: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--model", str(model), "--served-model-name", "m",
           "--port", str(port), "--enforce-eager", "--max-model-len", "1024",
           "--chat-template", "alpaca-ja"]
    return ServerProcess(name, cmd, log_dir / f"{name.split()[0]}-{port}.log", port,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"})


def _measure(server: ServerProcess) -> dict[str, float]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": DECODE_TOKENS, "temperature": 0,
            "ignore_eos": True, "eos_truncation": False, "return_token_ids": True}
    url = server.url + "/v1/completions"
    asyncio.run(concurrent(url, {**body, "max_tokens": 8}, 2))  # warm-up
    b1 = [decode_rate(asyncio.run(concurrent(url, body, 1))) for _ in range(3)]
    b8_streams = asyncio.run(concurrent(url, body, 8))
    return {"rss": server.tree_rss(children_only=True) / 2**30,
            "b1": statistics.median(b1), "b8": decode_rate(b8_streams),
            "bursts": sum(s.bursts for s in b8_streams) / max(1, sum(len(s.gaps) for s in b8_streams))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    realtime()
    models = _models(cache_root() / "bench")
    log_dir = Path(tempfile.mkdtemp(prefix="moegi-bench-moe-"))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    floor = _serve("tiny-llama floor", ensure_model("tiny-llama"), log_dir).start()
    floor_rss = floor.tree_rss(children_only=True) / 2**30
    floor.stop()
    for r in range(args.rounds):
        for name, path in models.items():
            server = _serve(name, path, log_dir).start()
            try:
                runs[name].append(_measure(server))
            finally:
                server.stop()
            print(f"round {r + 1}: {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    base = runs["bf16 MoE"]

    def ratio(results: list[dict[str, float]], key: str, off: float = 0.0) -> str:
        return spread([(x[key] - off) / (b[key] - off) for x, b in zip(results, base, strict=True)])

    rows = []
    for name, results in runs.items():
        rows.append([name, spread([x["rss"] for x in results]), ratio(results, "rss"),
                     ratio(results, "rss", floor_rss),
                     spread([x["b1"] for x in results]), ratio(results, "b1"),
                     spread([x["b8"] for x in results]), ratio(results, "b8"),
                     f"{statistics.mean(x['bursts'] for x in results):.0%}"])
    print(f"\nMixtral hidden {SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers, "
          f"{EXPERTS} experts ({PER_TOKEN} per token), intermediate {SHAPE['intermediate_size']}; "
          f"{args.rounds} rounds; ratios against bf16 MoE, median (min..max).\n"
          f"Engine floor (vLLM on a tiny model): {floor_rss:.2f} GiB. Logs: {log_dir}\n")
    print(table(["model", "engine RSS GiB", "RSS ratio", "RSS above floor, ratio",
                 "decode tok/s b1", "b1 ratio", "decode tok/s b8", "b8 ratio", "bursts b8"], rows))


if __name__ == "__main__":
    main()
