"""`make eval`: score a model and its 4-bit checkpoint side by side with lm-evaluation-harness.

    python -m evals.run --original DIR --quantized DIR [--tasks moegi_mc_ja,moegi_mc_en]
                        [--limit N] [--include-path DIR] [--serve-args "..."]

Each model is served by moegi in turn (`python -m serve`, in this environment), and the harness
(`lm_eval`, in `.venv-clients` or `$MOEGI_CLIENTS_PYTHON`: its pins are its own) scores it
through the OpenAI-compatible API with `local-completions`, the way users point the harness at
any server: loglikelihood tasks read `echo` + `logprobs`, which moegi returns untruncated for
such scoring requests (README: stop rules). The tokenizer comes from the server
(`tokenizer_backend=remote`: `/tokenizer_info`, `/tokenize`), so nothing is looked up on a hub.

It prints one Markdown table (per task and metric: the original's score, the 4-bit score, the
difference, each with the harness's standard error) that can go into the model card. The
default tasks are moegi's small offline Japanese and English sets (`evals/tasks/`); any lm-eval
task works where its data is at hand (`--tasks jsquad,...`, `--include-path` for task YAMLs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.common import free_port

HERE = Path(__file__).parent
REPO = HERE.parent
TASKS_DIR = HERE / "tasks"
DEFAULT_TASKS = "moegi_mc_ja,moegi_mc_en"
START_TIMEOUT_S = 600


def clients_python() -> Path:
    return Path(os.environ.get("MOEGI_CLIENTS_PYTHON", REPO / ".venv-clients" / "bin" / "python"))


@contextlib.contextmanager
def served(model: Path, name: str, extra: list[str], log: Path) -> Iterator[str]:
    """moegi on `model`, healthy; yields its base URL and stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--model", str(model), "--served-model-name", name,
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"moegi exited while loading {model}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"moegi did not become healthy on {model} in {START_TIMEOUT_S} s")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def lm_eval(url: str, name: str, tasks: str, out: Path, limit: int | None,
            include: list[Path]) -> dict[str, dict[str, float]]:
    """Run the harness against a server; {task: {metric: value, metric_stderr: value}}."""
    args = [str(clients_python()), "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"model={name},base_url={url}/v1/completions,num_concurrent=4,"
            "max_retries=1,tokenized_requests=True,tokenizer_backend=remote",
            "--tasks", tasks, "--output_path", str(out), "--seed", "1234"]
    for folder in include:
        args += ["--include_path", str(folder.resolve())]
    if limit:
        args += ["--limit", str(limit)]
    # Task YAMLs name their data relative to their folder (the shipped ones do).
    done = subprocess.run(args, cwd=include[0] if include else TASKS_DIR,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"lm_eval failed on {name} (exit {done.returncode})")
    result = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in result["results"].items():
        scores[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)}
    return scores


def table(original: dict[str, dict[str, float]], quantized: dict[str, dict[str, float]]) -> str:
    rows = ["| task | metric | original | 4-bit | difference |", "|---|---|---:|---:|---:|"]
    for task in sorted(original):
        for metric, value in sorted(original[task].items()):
            # Scores come with their standard error; bookkeeping numbers (sample_len) do not.
            if (metric.endswith("_stderr") or f"{metric}_stderr" not in original[task]
                    or metric not in quantized.get(task, {})):
                continue
            q = quantized[task][metric]
            se_o = original[task].get(f"{metric}_stderr", float("nan"))
            se_q = quantized[task].get(f"{metric}_stderr", float("nan"))
            rows.append(f"| {task} | {metric} | {value:.4f} ± {se_o:.4f} | {q:.4f} ± {se_q:.4f} "
                        f"| {q - value:+.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", required=True, help="the unquantized model folder (or a tiny "
                   "model name)")
    p.add_argument("--quantized", required=True, help="its 4-bit checkpoint (or a tiny model name)")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, help="at most this many documents per task")
    p.add_argument("--include-path", type=Path, action="append", default=[],
                   help="a folder of lm-eval task YAMLs (the shipped tasks are always included)")
    p.add_argument("--serve-args", default="", help="extra moegi-serve flags for both servers")
    a = p.parse_args(argv)
    if not clients_python().exists():
        print(f"{clients_python()} is missing: run `make clients-env` (or set "
              "MOEGI_CLIENTS_PYTHON to a Python with lm-eval[api])", file=sys.stderr)
        return 2
    from tiny.build import BUILDERS, ensure_model

    def resolve(arg: str) -> Path:
        path = Path(arg)
        if path.is_dir():
            return path
        if arg in BUILDERS:
            return ensure_model(arg)
        raise SystemExit(f"{arg}: no such model folder")

    models = {"original": resolve(a.original), "quantized": resolve(a.quantized)}
    include = [TASKS_DIR, *a.include_path]
    scores = {}
    with tempfile.TemporaryDirectory(prefix="moegi-eval-") as tmp:
        for role, model in models.items():
            print(f"== {role}: {model}", file=sys.stderr, flush=True)
            with served(model, "model", a.serve_args.split(), Path(tmp) / f"{role}.log") as url:
                scores[role] = lm_eval(url, "model", a.tasks, Path(tmp) / role, a.limit,
                                       include)
    print(f"\nlm-evaluation-harness through moegi: {models['original']} against "
          f"{models['quantized']} (tasks {a.tasks})\n")
    print(table(scores["original"], scores["quantized"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
