"""The vLLM engine behind the `Engine` interface: the only module the server uses vLLM through.

It starts vLLM's V1 `AsyncLLM` in-process (the engine core runs in a spawned subprocess, so the
program that calls it needs an `if __name__ == "__main__":` guard), asks for DELTA outputs
(only new text and ids per step: no cumulative copies on the hot path), and converts vLLM's
`RequestOutput` into the plain dataclasses of `engine.py`. vLLM's own Prometheus metrics
(`vllm:*`) are registered in prometheus_client's default registry by the engine itself.
(The `vllm_plugins` package also imports vLLM: vLLM loads it into its own processes. At start-up
`config.py` reads vLLM's engine-option names and `cli.py` its platform, both before the engine
exists.)

Health: vLLM's `check_health` reads an "errored" flag that is set only once a request finds
the engine dead, so this module also watches the engine's processes (its children): one that
has exited means a dead engine, noticed with no traffic at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

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
        counters (the engine updates them every step, streamed requests or not). Read through a
        restricted registry: collecting the whole registry (process stats, every histogram) on
        each idle-to-busy request cost 7% of the front end's CPU under load."""
        names = {"vllm:prompt_tokens_total", "vllm:generation_tokens_total"}
        return sum(sample.value for metric in self._counters.collect()
                   for sample in metric.samples if sample.name in names)

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


def _alive(p: Any) -> bool:
    import psutil

    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
