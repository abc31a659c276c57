"""`make bench`: moegi's front end against vLLM's own OpenAI server, on the same engine.

Both servers run the same model with the same engine flags, one at a time, alternating for
`--rounds` rounds (3 by default), at two scales:

- `tiny`: a bf16 Mixtral of hidden 128, 2 layers, 4 experts: the front end's own cost shows;
- `large`: a bf16 Mixtral of hidden 1024, 8 layers, 8 experts, where engine time dominates.

Both are bench/models.py's: random weights whose greedy text is whole characters, so every
token is one chunk on both servers.

Load (chat completions, 64 tokens, ignore_eos, the same prompt): streaming at 1, 8 and 32
concurrent requests, and 32 non-streamed. The client runs under SCHED_FIFO (bench/common.py)
and counts chunks that arrived in bursts. For each figure the table gives moegi / vLLM as the
median of the rounds' ratios with their min..max: tokens/s, time to first token p50/p90,
inter-chunk gap p50, the front end's CPU seconds per 1,000 tokens (the server's own process:
HTTP, serialisation, and vLLM's output processing and detokenization, which run there in both),
and start-up time to a healthy /health.

    make bench                  # or: .venv/bin/python -m bench.frontend [--rounds N] [--scale tiny]
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
    Stream,
    concurrent,
    free_port,
    post,
    realtime,
    spread,
    table,
)
from bench.models import LARGE_MOE, TINY_MOE
from bench.models import model as bench_model

TOKENS = 64
LEVELS = (1, 8, 32)


def _model(scale: str) -> Path:
    if scale == "tiny":
        return bench_model("tiny-moe", "mixtral", TINY_MOE)
    return bench_model("moe", "mixtral", LARGE_MOE)


def _server(kind: str, model: Path, log_dir: Path, moegi_repo: Path | None = None
            ) -> ServerProcess:
    port = free_port()
    engine = ["--model", str(model), "--served-model-name", "m", "--port", str(port),
              "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "64"]
    if kind == "moegi":
        cmd = [sys.executable, "-m", "serve", *engine, "--chat-template", "alpaca-ja"]
    else:
        import chat_templates

        template = log_dir / "alpaca-ja.jinja"
        template.write_text(chat_templates.load("alpaca-ja")[1], encoding="utf-8")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine,
               "--chat-template", str(template), "--no-enable-log-requests",
               "--disable-uvicorn-access-log"]
    return ServerProcess(kind, cmd, log_dir / f"{kind}-{port}.log", port,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"}, cwd=moegi_repo)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# Repetitions per load level, so that the front end's CPU time is hundreds of clock ticks
# (psutil reads it in 10 ms ticks): (1 stream, 8, 32, non-streamed 32) per scale.
REPS = {"tiny": (8, 4, 2, 4), "large": (3, 1, 1, 1)}


def _measure(server: ServerProcess, reps: tuple[int, ...]) -> dict[str, float]:
    body = {"model": "m", "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0,
            "eos_truncation": False,
            "messages": [{"role": "user", "content": "日本の首都はどこですか？"}]}
    url = server.url + "/v1/chat/completions"
    asyncio.run(concurrent(url, {**body, "max_tokens": 4}, 4))  # warm-up
    out: dict[str, float] = {"startup": server.startup_s}
    for n, rep in zip(LEVELS, reps, strict=False):
        cpu = server.tree_cpu_s()
        rounds: list[list[Stream]] = [asyncio.run(concurrent(url, body, n)) for _ in range(rep)]
        cpu = server.tree_cpu_s() - cpu
        streams = [s for r in rounds for s in r]
        walls = [max(s.chunks[-1] for s in r) - min(s.sent for s in r) for r in rounds]
        tokens = sum(s.tokens for s in streams)
        gaps = [g for s in streams for g in s.gaps]
        out[f"s{n} tok/s"] = tokens / sum(walls)
        out[f"s{n} ttft p50"] = _pct([s.ttft for s in streams], 0.5)
        out[f"s{n} ttft p90"] = _pct([s.ttft for s in streams], 0.9)
        out[f"s{n} gap p50"] = _pct(gaps, 0.5) if gaps else 0.0
        out[f"s{n} cpu/1k"] = 1000 * cpu / tokens
        out[f"s{n} bursts"] = sum(s.bursts for s in streams) / max(1, len(gaps))
    cpu = server.tree_cpu_s()
    wall, tokens = 0.0, 0
    for _ in range(reps[-1]):
        w, t = asyncio.run(post(url, body, 32))
        wall, tokens = wall + w, tokens + t
    out["n32 tok/s"] = tokens / wall
    out["n32 cpu/1k"] = 1000 * (server.tree_cpu_s() - cpu) / tokens
    return out


FIGURES = [(f"s{n} {k}", f"stream {n}: {k}") for n in LEVELS
           for k in ("tok/s", "ttft p50", "ttft p90", "gap p50", "cpu/1k")] + [
    ("n32 tok/s", "non-stream 32: tok/s"), ("n32 cpu/1k", "non-stream 32: cpu/1k"),
    ("startup", "start-up to /health")]


def run_scale(scale: str, rounds: int, log_dir: Path, moegi_repo: Path | None = None) -> str:
    model = _model(scale)
    runs: dict[str, list[dict[str, float]]] = {"moegi": [], "vllm": []}
    for r in range(rounds):
        order = ("moegi", "vllm") if r % 2 == 0 else ("vllm", "moegi")
        for kind in order:
            server = _server(kind, model, log_dir, moegi_repo).start()
            try:
                runs[kind].append(_measure(server, REPS[scale]))
            finally:
                server.stop()
            print(f"{scale} round {r + 1} {kind}: " + ", ".join(
                f"{k}={v:.3g}" for k, v in runs[kind][-1].items()), file=sys.stderr, flush=True)
    rows = []
    for key, label in FIGURES:
        ours = [x[key] for x in runs["moegi"]]
        theirs = [x[key] for x in runs["vllm"]]
        ratios = [a / b if b else float("nan") for a, b in zip(ours, theirs, strict=True)]
        rows.append([label, f"{statistics.median(ours):.4g}", f"{statistics.median(theirs):.4g}",
                     spread(ratios)])
    bursts = {k: statistics.mean(x[f"s{n} bursts"] for n in LEVELS for x in v)
              for k, v in runs.items()}
    head = (f"\n### {scale}: {model.name}, {rounds} rounds, {TOKENS} tokens per request\n"
            f"Chunks that arrived < 1 ms after the previous one: moegi {bursts['moegi']:.1%}, "
            f"vLLM {bursts['vllm']:.1%}.\n\n")
    return head + table(["figure", "moegi", "vLLM server", "moegi / vLLM, median (min..max)"],
                        rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", choices=("tiny", "large", "both"), default="both")
    parser.add_argument("--moegi-repo", type=Path, help="run moegi's server from this checkout "
                        "(an earlier commit, for a before/after table)")
    args = parser.parse_args(argv)
    fifo = realtime()
    log_dir = Path(tempfile.mkdtemp(prefix="moegi-bench-"))
    scales = ("tiny", "large") if args.scale == "both" else (args.scale,)
    reports = [run_scale(s, args.rounds, log_dir, args.moegi_repo) for s in scales]
    print(f"\nclient under SCHED_FIFO: {fifo}; logs: {log_dir}")
    print("\n".join(reports))


if __name__ == "__main__":
    main()
