"""The narrow engine interface the server talks to, and the plain data that crosses it.

The engine takes prompt token ids and sampling settings and yields per-choice deltas: new text
(already detokenized, UTF-8 safe), new token ids, logprobs as ids and floats, and why a choice
finished. It knows nothing of HTTP, chat templates or OpenAI's wire format. `vllm_engine.py`
implements it on vLLM's `AsyncLLM`; `tests/fakes.py` implements it for unit tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class EngineDeadError(RuntimeError):
    """The engine process died; the server answers 503 and exits so an orchestrator restarts it."""


class EngineInputError(ValueError):
    """The engine refused the request's input (a schema it cannot compile, say): a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# What a request sets, the spec carries and vLLM's SamplingParams reads, all under these names:
# listed once, passed through by protocol.py (`to_spec`) and vllm_engine.py (`_params`).
PASSTHROUGH = ("n", "temperature", "top_p", "min_p", "seed", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "ignore_eos", "skip_special_tokens")


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Engine-neutral sampling settings, built and validated by the protocol layer."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Stop strings the engine matches on the detokenized text. The engine keeps the matched string
    # in its output (the serving layer holds back and cuts it, holding back only what a stop
    # string could still need), and reports it as `stop_reason`.
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per sampled token; None: off
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    # Structured output: a JSON schema the reply must follow, or any JSON object.
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    # True: the caller consumes the output step by step (a stream). False: it needs only the
    # finished choices, which the engine then sends once (no per-token work in between).
    incremental: bool = True


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs for one generated (or prompt) position: the chosen token, then the top-k."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice produced since the previous step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # The stop string matched, a stop token id, or None for the EOS token / length.
    stop_reason: int | str | None = None


@dataclass(slots=True)
class EngineStep:
    """One step of a request's output stream."""

    choices: list[ChoiceDelta]
    num_prompt_tokens: int
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first step only


class Engine(Protocol):
    """What the server needs from an inference engine: four methods."""

    def generate(
        self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str
    ) -> AsyncIterator[EngineStep]:
        """Stream the request's output; raises EngineDeadError if the engine dies and
        EngineInputError if it refuses the input."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request (client gone); unknown or finished ids are ignored."""
        ...

    async def check_health(self) -> None:
        """Return if the engine can serve, raise EngineDeadError if it cannot."""
        ...

    def progress(self) -> float:
        """A number that grows while the engine works: tokens computed (prompt or generated),
        and the CPU its processes spend within a long step."""
        ...
