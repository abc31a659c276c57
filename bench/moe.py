"""`make bench-moe`: the 4-bit AWQ MoE on this CPU (moegi's vLLM plugin) against the same MoE in bf16.

One Mixtral large enough for the figures to mean something (hidden 1024, 8 layers, 8 experts,
2 per token, random bf16 weights), served by moegi on vLLM as `make serve` serves (compiled):

- bf16: vLLM's own unquantized CPU MoE kernel (`cpu_fused_moe`);
- AWQ 4-bit GEMM (group 128, zero point): moegi's CPU plugin (`serve/vllm_plugin.py`);
- reference point: a dense Llama of the same total size, 4-bit, through vLLM's dense CPU AWQ
  kernel (`CPUWNA16LinearKernel`).

The models are bench/models.py's (random weights whose greedy text is whole characters; 4-bit
by `moegi-quantize --method rtn`, the same files an AWQ run writes). Every figure is a ratio against the bf16
MoE measured in the same invocation, rounds alternating between the servers; the engine's
resident memory is that of vLLM's engine processes (the server's children), and it is also
given above the engine of a tiny model (the runtime's own floor, measured here too).

    make bench-moe                       # or: .venv/bin/python -m bench.moe [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import (
    ServerProcess,
    concurrent,
    decode_rate,
    free_port,
    realtime,
    spread,
    table,
)
from bench.models import LARGE_MOE
from bench.models import model as bench_model
from serve.tiny.build import ensure_model

EXPERTS, PER_TOKEN = LARGE_MOE["num_local_experts"], LARGE_MOE["num_experts_per_tok"]
PROMPT = "日本の首都はどこですか？東京について、歴史と文化と食べ物を詳しく説明してください。"
DECODE_TOKENS = 96
# The dense reference: every expert's MLP side by side in one MLP, the same total weights.
DENSE = {k: v for k, v in LARGE_MOE.items() if k not in ("num_local_experts", "num_experts_per_tok")}
DENSE["intermediate_size"] = EXPERTS * LARGE_MOE["intermediate_size"]


def _models() -> dict[str, Path]:
    return {"bf16 MoE": bench_model("moe", "mixtral", LARGE_MOE),
            "AWQ 4-bit MoE": bench_model("moe", "mixtral", LARGE_MOE, quantized=True),
            "AWQ 4-bit dense (reference)": bench_model("dense", "llama", DENSE, quantized=True)}


def _serve(name: str, model: Path, log_dir: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--model", str(model), "--served-model-name", "m",
           "--port", str(port), "--max-model-len", "1024",
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
    models = _models()
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
    print(f"\nMixtral hidden {LARGE_MOE['hidden_size']}, {LARGE_MOE['num_hidden_layers']} layers, "
          f"{EXPERTS} experts ({PER_TOKEN} per token), intermediate "
          f"{LARGE_MOE['intermediate_size']}; "
          f"{args.rounds} rounds; ratios against bf16 MoE, median (min..max).\n"
          f"Engine floor (vLLM on a tiny model): {floor_rss:.2f} GiB. Logs: {log_dir}\n")
    print(table(["model", "engine RSS GiB", "RSS ratio", "RSS above floor, ratio",
                 "decode tok/s b1", "b1 ratio", "decode tok/s b8", "b8 ratio", "bursts b8"], rows))


if __name__ == "__main__":
    main()
