"""`make bench-moe`: the 4-bit MoE at real layer shapes on this CPU, against bf16 and llama.cpp.

A Mixtral with the layer shape of Swallow-MoE-4x7B (default) or Swallow-MX-8x7B (`--shape 8x7b`),
`--layers` layers, random bf16 weights (bench/models.py; the tiny tokenizer's 600 tokens, so the
head costs next to nothing and the layers are what is timed), one server at a time:

- **bf16**: moegi on vLLM, as `make serve` serves it (vLLM's CPU MoE kernel);
- **4-bit, as served**: the round-to-nearest 4-bit copy (`moegi-quantize --method rtn`: the
  AutoAWQ GEMM files an AWQ run writes, group 128) under moegi as `make serve` serves it: vLLM's
  own `CPUExpertsInt4` where the CPU has AMX, moegi's plugin where it has not (the log says which);
- **4-bit, moegi plugin**: the same with `MOEGI_CPU_MOE=plugin`, what a CPU without AMX gets;
  run only where the row above was not already the plugin;
- **llama.cpp Q4_0 / Q4_K_M**: the same bf16 folder through llama.cpp's own converter and
  `llama-quantize`, served by `llama-server` with parallel slots (its continuous batching), on
  the same 2 threads. Built by `make bench-env` from llama-cpp-python's PyPI source.

Per server: start-up (launch to healthy: load, repack, warm-up), the peak resident memory of its
process tree while starting, prefill as prompt tokens per second of the time to first token for
a 128- and a 2,048-token prompt (random token ids, new ones for every request, so no prefix cache
helps), and decode tokens/s at 1, 8 and 32 concurrent streams. Ratios are against bf16 and against
llama.cpp Q4_0 in the same round (rounds alternate the servers), median (min..max) over rounds.

    make bench-moe [BARGS="--shape 8x7b --layers 4 --rounds 2"]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, ServerProcess, Stream, concurrent, decode_rate, free_port, realtime, table
from bench.models import REAL_SHAPES
from bench.models import model as bench_model
from tiny.build import cache_root

LLAMA_CPP = REPO / ".venv-bench"
PREFILL = (128, 2048)
DECODE = (1, 8, 32)
DECODE_TOKENS = 64
VOCAB = range(259, 600)  # the tiny tokenizer's pieces after <unk> <s> </s> and the 256 bytes
PLUGIN_LOG = "run on moegi's CPU kernel"  # vllm_plugins/awq_cpu.py's line when it takes a layer
NO_AMX = "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"  # oneDNN's ISA cap (vllm_plugins/cpu_isa.py)


@dataclass
class Engine:
    name: str
    start: Callable[[Path], ServerProcess]
    moegi: bool = True  # takes moegi's request extensions


def _moegi(name: str, model: Path, env: dict[str, str] | None = None) -> Engine:
    def start(log_dir: Path) -> ServerProcess:
        port = free_port()
        cmd = [sys.executable, "-m", "serve", "--model", str(model), "--served-model-name", "m",
               "--port", str(port), "--max-model-len", "4096", "--chat-template", "alpaca-ja"]
        return ServerProcess(name, cmd, log_dir / f"{_slug(name)}.log", port,
                             env={"VLLM_CPU_KVCACHE_SPACE": "4", **(env or {})})
    return Engine(name, start)


def _llama(name: str, src: Path, kind: str, repack: bool = True) -> Engine:
    def start(log_dir: Path) -> ServerProcess:
        path = gguf(src, kind)  # converted on first use, before the server's clock starts
        port = free_port()
        # One unified KV cache of 8,192 tokens shared by 32 slots: the decode runs need 32 short
        # streams, the prefill runs one 2,048-token prompt. Repacked layouts (llama.cpp's
        # default, its fastest CPU path) unless they crashed on this host (`main` retries).
        cmd = [str(LLAMA_CPP / "build" / "bin" / "llama-server"), "-m", str(path), "--port",
               str(port), "--host", "127.0.0.1", "-t", "2", "-tb", "2", "-np", str(max(DECODE)),
               "-c", "8192", "--kv-unified", "-a", "m", *([] if repack else ["--no-repack"])]
        return ServerProcess(name, cmd, log_dir / f"{_slug(name)}.log", port)
    return Engine(name, start, moegi=False)


def without_repack(engine: Engine, src: Path, kind: str) -> Engine:
    """The same llama.cpp server with `--no-repack`: on an AMX host its repacked AMX path died
    at start-up with SIGILL (the kernel grants it no AMX tile state), seen here."""
    return _llama(f"{engine.name} (--no-repack: repacked crashed here)", src, kind, repack=False)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def gguf(src: Path, kind: str) -> Path:
    """The bf16 folder in llama.cpp's GGUF, quantized to `kind` (cached beside the folder)."""
    out = src.parent / f"{src.name}.{kind}.gguf"
    if out.exists():
        return out
    full = src.parent / f"{src.name}.bf16.gguf"
    if not full.exists():
        subprocess.run([str(LLAMA_CPP / "bin" / "python"),
                        str(LLAMA_CPP / "src" / "convert_hf_to_gguf.py"), str(src), "--outtype",
                        "bf16", "--outfile", str(full)], check=True, stdout=sys.stderr)
    subprocess.run([str(LLAMA_CPP / "build" / "bin" / "llama-quantize"), str(full),
                    str(out.with_suffix(".partial")), kind, "2"], check=True, stdout=sys.stderr)
    out.with_suffix(".partial").rename(out)
    return out


def engines(shape: str, layers: int, names: set[str] | None,
            env: dict[str, str]) -> tuple[list[Engine], Path]:
    config = {**REAL_SHAPES[shape], "num_hidden_layers": layers}
    name = f"real-{shape}-{layers}l"
    bf16 = bench_model(name, "mixtral", config)
    awq = bench_model(name, "mixtral", config, quantized=True)
    out = [_moegi("bf16", bf16, env), _moegi("4-bit as served", awq, env),
           _moegi("4-bit moegi plugin", awq, {**env, "MOEGI_CPU_MOE": "plugin"}),
           _llama("llama.cpp Q4_0", bf16, "Q4_0"), _llama("llama.cpp Q4_K_M", bf16, "Q4_K_M")]
    return [e for e in out if names is None or e.name in names or e.name == "bf16"], bf16


class Prompts:
    """Random token-id prompts, never the same twice in a run (no prefix cache helps)."""

    def __init__(self) -> None:
        self.rng = random.Random(0)

    def __call__(self, n: int) -> list[int]:
        return [self.rng.choice(VOCAB) for _ in range(n)]


def measure(server: ServerProcess, engine: Engine, prompts: Prompts) -> dict[str, float]:
    url = server.url + "/v1/completions"
    extra = {"eos_truncation": False, "return_token_ids": True} if engine.moegi else {}

    def body(prompt_len: int, tokens: int) -> dict[str, object]:
        return {"model": "m", "prompt": prompts(prompt_len), "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True, **extra}

    def run(prompt_len: int, tokens: int, n: int) -> list[Stream]:
        """n streams started together, each with its own prompt."""
        async def go() -> list[list[Stream]]:
            return list(await asyncio.gather(*(concurrent(url, body(prompt_len, tokens), 1)
                                               for _ in range(n))))
        return [s for group in asyncio.run(go()) for s in group]

    run(16, 4, 2)  # warm-up of the request path
    result: dict[str, float] = {"startup": server.startup_s, "peak": server.peak_rss / 2**30}
    for n in PREFILL:
        result[f"prefill {n}"] = statistics.median(n / run(n, 2, 1)[0].ttft for _ in range(2))
    for n in DECODE:
        streams = run(32, DECODE_TOKENS, n)
        for s in streams:
            s.tokens = s.tokens or len(s.chunks)  # llama-server sends no usage in streams
        result[f"decode b{n}"] = decode_rate(streams)
    result["rss"] = server.tree_rss() / 2**30
    return result


_STAMP = re.compile(r"\d\d-\d\d (\d\d):(\d\d):(\d\d) ")
PHASES = {"load": "Loading weights took", "repack": "Warming up model for the compilation",
          "warm-up": "init engine (profile, create kv cache, warmup model) took"}


def phases(log: str) -> dict[str, float]:
    """Where a vLLM server's start-up went, from its own log lines (seconds): reading the
    weights, processing them after loading (moegi's repack, vLLM's AMX prepack: the time from
    the end of loading to the start of warm-up), and vLLM's engine set-up with compile and
    warm-up. Empty for a log without them (llama.cpp)."""
    def at(line: str) -> float:
        m = _STAMP.search(line)
        return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) if m else float("nan")

    lines = {name: next((x for x in log.splitlines() if mark in x), None)
             for name, mark in PHASES.items()}
    if None in lines.values():
        return {}
    took = re.compile(r"took ([0-9.]+) s")
    load, repack, warm = (lines[k] or "" for k in PHASES)
    return {"load": float(m[1]) if (m := took.search(load)) else float("nan"),
            "repack": (at(repack) - at(load)) % 86400,
            "warm-up": float(m[1]) if (m := took.search(warm)) else float("nan")}


COLUMNS = (["startup", "peak"] + [f"prefill {n}" for n in PREFILL]
           + [f"decode b{n}" for n in DECODE])


def report(runs: dict[str, list[dict[str, float]]], base: str) -> str:
    """Each cell: the median figure, then its ratio to `base` in the same round."""
    rows = []
    for name, results in runs.items():
        row = [name]
        for key in COLUMNS:
            value = statistics.median(r[key] for r in results)
            ratios = [r[key] / b[key] for r, b in zip(results, runs[base], strict=False)]
            mid = statistics.median(ratios)
            span = f" {min(ratios):.2f}..{max(ratios):.2f}" if len(ratios) > 1 else ""
            row.append(f"{value:.1f} ({mid:.2f}x{span})")
        rows.append(row)
    units = {"startup": "start-up s", "peak": "peak RSS GiB"}
    header = ["server"] + [units.get(k, k.replace("prefill", "prefill tok/s").replace(
        "decode", "decode tok/s")) for k in COLUMNS]
    return table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(REAL_SHAPES), default="4x7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", help="comma-separated server names to run beside bf16")
    parser.add_argument("--build-only", action="store_true", help="make the models and stop")
    parser.add_argument("--no-amx", action="store_true",
                        help="on a host with AMX, run every vLLM server as on a CPU without it "
                             f"({NO_AMX}, which moegi's plugin extends to all of vLLM)")
    args = parser.parse_args(argv)
    names = set(args.only.split(",")) if args.only else None
    env = dict([NO_AMX.split("=")]) if args.no_amx else {}
    todo, bf16_dir = engines(args.shape, args.layers, names, env)
    if args.build_only:
        return
    realtime()
    log_dir = Path(tempfile.mkdtemp(prefix="moegi-bench-moe-"))
    prompts = Prompts()
    runs: dict[str, list[dict[str, float]]] = {}
    plugin_served = False  # the as-served row ran on moegi's plugin: this CPU has no AMX (or capped)
    for r in range(args.rounds):
        for engine in list(todo):
            if plugin_served and engine.name == "4-bit moegi plugin":
                continue
            server = engine.start(log_dir)
            try:
                try:
                    server.start()
                except RuntimeError:
                    if engine.moegi or "--no-repack" in engine.name:
                        raise
                    server.stop()
                    kind = engine.name.split()[-1]
                    todo[todo.index(engine)] = engine = without_repack(engine, bf16_dir, kind)
                    server = engine.start(log_dir)
                    server.start()
                runs.setdefault(engine.name, []).append(measure(server, engine, prompts))
            finally:
                server.stop()
            runs[engine.name][-1].update(phases(server.log.read_text()))
            if engine.name == "4-bit as served" and PLUGIN_LOG in server.log.read_text():
                # This CPU has no AMX: the as-served row is the plugin already.
                plugin_served = True
                todo = [e for e in todo if e.name != "4-bit moegi plugin"]
            print(f"round {r + 1}: {engine.name}: {runs[engine.name][-1]}", file=sys.stderr,
                  flush=True)
    served = "moegi plugin" if plugin_served else "vLLM CPUExpertsInt4 (AMX)"
    cfg = REAL_SHAPES[args.shape]
    print(f"\nMixtral with the {args.shape} layer shape: hidden {cfg['hidden_size']}, intermediate "
          f"{cfg['intermediate_size']}, {cfg['num_local_experts']} experts "
          f"({cfg['num_experts_per_tok']} per token), {args.layers} layers. 4-bit as served: "
          f"{served}. {args.rounds} rounds; logs: {log_dir}; cache: {cache_root() / 'bench'}\n")
    print("Against bf16 (ratio: higher is better for tokens/s, lower for start-up and memory):\n")
    print(report(runs, "bf16"))
    q4 = next((n for n in runs if n.startswith("llama.cpp Q4_0")), None)
    if q4:
        print(f"\nAgainst {q4}:\n")
        print(report(runs, q4))
    started = {name: r for name, r in runs.items() if all(k in x for x in r for k in PHASES)}
    if started:
        print("\nStart-up phases of the vLLM servers, seconds (median): weights read, weights "
              "processed after loading (repack / prepack), engine set-up with compile and "
              "warm-up:\n")
        print(table(["server", *PHASES], [[name, *(f"{statistics.median(x[k] for x in r):.1f}"
                                                  for k in PHASES)]
                                          for name, r in started.items()]))
    # The kernel alone at this shape: GB/s of weight read at 1 and 8 rows, beside the copy
    # bandwidth measured in the same run (bench/kernel.py).
    print("\nmoegi's native kernel at this shape (python -m bench.kernel):\n", flush=True)
    subprocess.run([sys.executable, "-m", "bench.kernel", "--shape", args.shape, "--rows",
                    "1,8,64", "--rounds", "3"], check=True, env={**os.environ, **env})


if __name__ == "__main__":
    main()
