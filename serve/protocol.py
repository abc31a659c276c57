"""OpenAI wire models for requests, with moegi's extensions, and their conversion to sampling.

Requests are pydantic models (so `/docs` is the API reference and bad input is a 400 in the
OpenAI envelope, see errors.py). Responses are built as plain dicts in `serving_*.py`: per-chunk
pydantic objects would cost more than the cheap serialisation the streaming path needs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.engine import SamplingSpec


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is treated as system; tool messages are not supported."
    )
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A model id from GET /v1/models.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=64, description="Choices to generate (needs temperature > 0).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="Extension: sample from the k best (0 or -1: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Extension.")
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="Extension (1: off).")
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stop_token_ids: list[int] | None = Field(None, description="Extension.")
    ignore_eos: bool = Field(False, description="Extension: do not stop on the EOS token.")
    skip_special_tokens: bool = Field(True, description="Extension.")
    include_stop_str_in_output: bool = Field(
        False, description="Extension: keep the matched stop string at the end of the text."
    )
    eos_truncation: bool | None = Field(
        None, description="Extension: also stop on the EOS token's text (</s>) and on the "
        "template's turn markers (### 指示:, [INST], ...). Default: the server's (on).")
    sentence_trim: bool | None = Field(
        None, description="Extension: when the length limit is hit, trim the reply back to its "
        "last sentence end (。！？!?.). Default: the server's (off).")
    return_token_ids: bool = Field(
        False, description="Extension (as vLLM's): each choice also carries `token_ids`, the "
        "generated token ids, and `prompt_token_ids`; a stream sends the new ids per chunk and "
        "the prompt's in its first chunk.")
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> _Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise ValueError("'stop' strings must be non-empty")
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError("n > 1 needs sampling: set temperature above 0 or use n = 1")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_spec(self, max_tokens: int, stop: tuple[str, ...], logprobs: int | None,
                prompt_logprobs: int | None = None) -> SamplingSpec:
        return SamplingSpec(
            max_tokens=max_tokens,
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


_UNSUPPORTED_CHAT = {
    "tools": "tool calling is not supported by moegi yet; leave 'tools' out",
    "tool_choice": "tool calling is not supported by moegi yet; leave 'tool_choice' out",
    "functions": "function calling is not supported; leave 'functions' out",
    "audio": "audio output is not supported; leave 'audio' out",
}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="Extension: end with the reply header.")
    continue_final_message: bool = Field(
        False, description="Extension: continue the last (assistant) message instead.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred to max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    audio: Any = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        for name, why in _UNSUPPORTED_CHAT.items():
            if getattr(self, name) is not None:
                raise ValueError(why)
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a batch of texts, token ids, or a batch of token id lists."
    )
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI: 16).")
    echo: bool = Field(False, description="Return the prompt before the completion.")
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("'suffix' (insertion) is not supported; leave it out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("'prompt' is empty: send a string or a non-empty list")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch as a list of text or token-id prompts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]
