"""The vLLM engine behind the `Engine` interface: the one module of the server that speaks to
vLLM's Python API.

It starts vLLM's V1 `AsyncLLM` in-process (the engine core runs in a spawned subprocess, so the
program that calls it needs an `if __name__ == "__main__":` guard), asks for DELTA outputs
(only new text and ids per step: no cumulative copies on the hot path), and converts vLLM's
`RequestOutput` into the plain dataclasses of `engine.py`. vLLM's own Prometheus metrics
(`vllm:*`) are registered in prometheus_client's default registry by the engine itself.
Before the engine exists, `prepare` checks the settings against vLLM (its engine options, its
platform's splits, the dtype on a CPU). The `vllm_plugins` package also imports vLLM: vLLM loads
it into its own processes.

Health: vLLM's `check_health` reads an "errored" flag that is set only once a request finds
the engine dead, so this module also watches the engine's processes (its children): one that
has exited means a dead engine, noticed with no traffic at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serve.config import Settings
from serve.engine import (
    PASSTHROUGH,
    ChoiceDelta,
    EngineDeadError,
    EngineInputError,
    EngineStep,
    SamplingSpec,
    TokenLogprobs,
)

log = logging.getLogger(__name__)


def _logprobs(entries: Any, chosen: list[int], k: int) -> list[TokenLogprobs]:
    """vLLM's per-position {id: Logprob} dicts -> the chosen token, and the top-k by rank.

    vLLM returns the k best plus the chosen token when that is not among them (k + 1 entries).
    """
    out = []
    for token_id, pos in zip(chosen, entries, strict=False):
        ranked = sorted(pos.items(), key=lambda kv: kv[1].rank or 0)[:k]
        out.append(TokenLogprobs(token_id, pos[token_id].logprob,
                                 [(tid, lp.logprob) for tid, lp in ranked]))
    return out


class VllmEngine:
    """`Engine` on vLLM's AsyncLLM (V1)."""

    def __init__(self, engine_args: dict[str, Any], served_model_name: str | None = None) -> None:
        # Imported here so that importing this module (for --help, say) stays cheap.
        import psutil
        from prometheus_client import REGISTRY
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = dict(engine_args)
        args["structured_outputs_config"] = _structured_outputs_config(
            args.get("structured_outputs_config"))
        if served_model_name:
            args["served_model_name"] = served_model_name  # the model_name label of vllm:*
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self.max_model_len: int = self._llm.model_config.max_model_len
        # vLLM's engine core and workers; the multiprocessing resource tracker is not ours.
        self._procs = [p for p in psutil.Process().children(recursive=True)
                       if "resource_tracker" not in " ".join(_cmdline(p))]
        self._counters = REGISTRY.restricted_registry(
            ["vllm:prompt_tokens_total", "vllm:generation_tokens_total"])

    def _params(self, spec: SamplingSpec) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        structured = None
        if spec.json_schema is not None:
            structured = StructuredOutputsParams(json=spec.json_schema)
        elif spec.json_object:
            structured = StructuredOutputsParams(json_object=True)
        return SamplingParams(
            **{name: getattr(spec, name) for name in PASSTHROUGH},
            max_tokens=spec.max_tokens,
            top_k=spec.top_k,
            stop=list(spec.stop),
            stop_token_ids=list(spec.stop_token_ids),
            logprobs=spec.logprobs,
            prompt_logprobs=spec.prompt_logprobs,
            logit_bias=spec.logit_bias,
            structured_outputs=structured,
            # The serving layer cuts stop strings itself with a minimal hold-back; vLLM's own
            # hold-back would delay every chunk by len(longest stop) - 1 characters.
            include_stop_str_in_output=True,
            output_kind=RequestOutputKind.DELTA if spec.incremental
            else RequestOutputKind.FINAL_ONLY,
            skip_clone=True,  # made for this one request: vLLM's deep copy (4% of CPU) is waste
        )

    async def generate(
        self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
    ) -> AsyncIterator[EngineStep]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

        try:
            params = self._params(spec)
        except VLLMClientError as e:
            raise EngineInputError(str(e), getattr(e, "parameter", None)) from e
        first = True
        try:
            async for out in self._llm.generate(tokens_input(prompt_token_ids), params, request_id):
                choices = [
                    ChoiceDelta(
                        index=c.index,
                        text=c.text,
                        token_ids=list(c.token_ids),
                        logprobs=_logprobs(c.logprobs, list(c.token_ids), spec.logprobs or 0)
                        if c.logprobs is not None
                        else None,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    for c in out.outputs
                ]
                prompt_lps = None
                if first and out.prompt_logprobs is not None:
                    k = spec.prompt_logprobs or 0
                    prompt_lps = [None, *_logprobs(out.prompt_logprobs[1:], prompt_token_ids[1:], k)]
                first = False
                yield EngineStep(choices, len(prompt_token_ids), prompt_lps)  # type: ignore[arg-type]
        except VllmDead as e:
            raise EngineDeadError(str(e)) from e
        except VLLMClientError as e:  # the engine refused the input (a schema, say): a 400
            raise EngineInputError(str(e), getattr(e, "parameter", None)) from e

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineDeadError(str(self._llm.dead_error))
        for p in self._procs:
            if not _alive(p):
                raise EngineDeadError(f"the engine process {p.pid} has exited")
        try:
            await self._llm.check_health()
        except Exception as e:  # vLLM raises its own EngineDeadError here
            raise EngineDeadError(str(e)) from e

    def progress(self) -> float:
        """Tokens vLLM has processed: its own `vllm:prompt_tokens` and `vllm:generation_tokens`
        counters (the engine updates them every step, streamed requests or not), read through a
        restricted registry (collecting the whole registry on each idle-to-busy request cost 7%
        of the front end's CPU under load); plus one for every BUSY_CPU_S of CPU time the
        engine's processes spent. The counters move only when a step ends, and one step can
        outlast `engine_stall_s`: a 2,048-token prompt of a bf16 4x7B on 2 cores without AMX
        took 35 s in one step, and a longer one was reported hung mid-step. A hung engine
        (blocked, or dead in a way its processes survive) spends next to no CPU."""
        names = {"vllm:prompt_tokens_total", "vllm:generation_tokens_total"}
        tokens = sum(sample.value for metric in self._counters.collect()
                     for sample in metric.samples if sample.name in names)
        return tokens + _cpu_seconds(self._procs) // BUSY_CPU_S

    def shutdown(self) -> None:
        self._llm.shutdown()


def _structured_outputs_config(given: Any) -> Any:
    """vLLM's structured outputs on xgrammar with compact JSON (no free whitespace between
    tokens): small models otherwise loop on the whitespace the JSON grammar allows and never
    close the object. `--engine-args '{"structured_outputs_config": {...}}'` overrides it."""
    from vllm.config import StructuredOutputsConfig

    if isinstance(given, StructuredOutputsConfig):
        return given
    return StructuredOutputsConfig(**{"backend": "xgrammar", "disable_any_whitespace": True,
                                      **(given or {})})


def _cmdline(p: Any) -> list[str]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return list(p.cmdline())
    return []


# CPU seconds of the engine's processes that count as progress: more than its idle loops spend
# in a stall window (an idle engine here: 1-2% of a core, under 1.2 s a minute); a computing one
# spends it in 2.5 s on 2 cores.
BUSY_CPU_S = 5.0


def _cpu_seconds(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _alive(p: Any) -> bool:
    import psutil

    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


# Start-up: what vLLM's Python API decides about the settings, before the engine exists.

def prepare(settings: Settings) -> None:
    """Check the settings against vLLM and settle what vLLM would get wrong, before loading:
    the engine options it knows, the platform's splits, and the dtype on a CPU. ValueError
    names the fix."""
    _check_engine_args(settings)
    _check_platform(settings)
    _cpu_dtype(settings)


def _check_engine_args(settings: Settings) -> None:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(settings.vllm_args()) - known)
    if unknown:
        raise ValueError(f"unknown vLLM engine option(s) {', '.join(unknown)}: see vLLM's "
                         "AsyncEngineArgs for the names --engine-args takes")


def _check_platform(settings: Settings) -> None:
    """What vLLM's platform decides about a split, settled before vLLM starts: Ray needs a
    platform that supports it, and several CPU ranks need their own cores (serve/parallel.py)."""
    if settings.distributed_executor_backend != "ray" and (
            settings.tensor_parallel_size, settings.pipeline_parallel_size) == (1, 1):
        return
    from vllm.platforms import current_platform

    from serve.parallel import THREADS_BIND, bind_cpu_threads

    if settings.distributed_executor_backend == "ray" and not current_platform.ray_device_key:
        # vLLM raises this only once its engine core has started and joined the Ray cluster.
        raise ValueError(f"--distributed-executor-backend ray: vLLM's {current_platform.device_name} "
                         "platform does not run on Ray (vLLM raises 'does not support ray'); use "
                         "--distributed-executor-backend mp on one machine, or Ray on GPU hosts")
    if current_platform.is_cpu() and settings.pipeline_parallel_size > 1 and settings.enforce_eager:
        # vllm/v1/worker/cpu_model_runner.py: `warming_up_model` returns early in eager mode, and
        # it is what allocates a later stage's intermediate-tensor buffer: the first request then
        # kills the engine (AssertionError in sync_and_gather_intermediate_tensors).
        raise ValueError("--pipeline-parallel-size with --enforce-eager: vLLM's CPU workers "
                         "(0.32) set up the later stages' buffers only when they compile, and the "
                         "first request would kill the engine; leave --enforce-eager out")
    if current_platform.is_cpu() and (bound := bind_cpu_threads(
            settings.tensor_parallel_size, settings.pipeline_parallel_size)):
        log.info("CPU ranks bound to cores %s (%s; set it yourself to choose)", bound,
                 THREADS_BIND)


def _cpu_dtype(settings: Settings) -> None:
    """On a CPU, `--dtype auto` serves a float16 checkpoint (every AutoAWQ one) in bfloat16.

    vLLM would keep float16, which x86 CPUs compute slowly: its CPU AWQ kernel then takes its
    generic path instead of AMX, and moegi's int4 kernels are vectorized for bfloat16 only.
    Measured by `make bench-moe` (4x7B layer shape, 4-bit against bf16): decode at batch 1 went
    from 1.31x to 2.58x and prefill of 2,048 tokens from 0.24x to 0.63x on vLLM's AMX path, and
    from 1.09x to 1.95x and 0.25x to 0.87x on moegi's plugin. `--dtype float16` keeps float16."""
    config = Path(settings.model or "") / "config.json"
    if settings.dtype != "auto" or not config.is_file():
        return
    cfg = json.loads(config.read_text())
    if (cfg.get("torch_dtype") or cfg.get("dtype")) != "float16":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        settings.dtype = "bfloat16"
        log.info("float16 checkpoint served in bfloat16 on this CPU (--dtype float16 to keep it)")
