"""OpenAI wire models for requests, with moegi's extensions, and their conversion to sampling.

Requests are pydantic models (so `/docs` is the API reference and bad input is a 400 in the
OpenAI envelope, see errors.py). Every value is checked here against the range the engine
accepts (seeds in int64, text without lone surrogates, ...) so that no client input reaches the
engine in a form it would fail on; the checks that need the tokenizer or the server's limits
are in `model.check_request`. Responses are built as plain dicts in `serving_*.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.engine import PASSTHROUGH, SamplingSpec

INT64 = 2**63


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate (such as \\ud800), which is not "
                         "valid Unicode: send valid UTF-8 text") from None
    return s


# Every string a client sends: lone surrogates are refused before anything else sees them.
Text = Annotated[str, AfterValidator(_valid_unicode)]
Seed = Annotated[int, Field(ge=-INT64, lt=INT64, description="Any signed 64-bit integer.")]


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="End the stream with a usage chunk "
                                "(empty choices).")
    continuous_usage_stats: bool = Field(
        False, description="Extension (as vLLM's; guidellm sends it): with include_usage, "
        "every chunk also carries the usage so far.")


class TextPart(BaseModel):
    type: Literal["text", "input_text", "output_text"] = Field(
        description="A text part; the three names OpenAI's APIs use are read alike.")
    text: Text = Field(description="The text.")


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is treated as system; tool messages are not supported."
    )
    content: Text | list[TextPart] | None = Field(
        None, description="The message text, or a list of text parts (joined).")
    name: Text | None = Field(default=None, description="The author's name, passed to the "
                              "template.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JsonSchemaFormat(BaseModel):
    name: Text = Field("response", description="The schema's name.")
    description: Text | None = Field(None, description="What the schema is for (not used).")
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                    description="The JSON Schema the reply must follow.")
    strict: bool | None = Field(None, description="Accepted; the grammar always applies.")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="Free text, any JSON object, or JSON following `json_schema`.")
    json_schema: JsonSchemaFormat | None = Field(None, description="With type json_schema.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs 'json_schema': "
                             "{'name': ..., 'schema': {...}}")
        return self


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: Text = Field(description="A model id from GET /v1/models.")
    stream: bool = Field(False, description="Send the reply as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="With stream: usage chunks.")
    n: int = Field(1, ge=1, le=64, description="Choices to generate (needs temperature > 0).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: the probability mass "
                         "kept.")
    top_k: int = Field(0, ge=-1, description="Extension: sample from the k best (0 or -1: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Extension.")
    seed: Seed | None = Field(None, description="Seed for sampling: the same seed, the same text.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty on tokens already "
                                    "present.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty growing with a "
                                     "token's count so far.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="Extension (1: off).")
    logit_bias: dict[Text, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100], added to its logit.")
    stop: Text | list[Text] | None = Field(None, description="Up to --max-stop strings that end "
                                           "the reply (cut before them).")
    stop_token_ids: list[int] | None = Field(None, description="Extension: token ids that end a "
                                             "choice.")
    ignore_eos: bool = Field(False, description="Extension: do not stop on the EOS token.")
    skip_special_tokens: bool = Field(True, description="Extension.")
    include_stop_str_in_output: bool = Field(
        False, description="Extension: keep the matched stop string at the end of the text."
    )
    eos_truncation: bool | None = Field(
        None, description="Extension: also stop on the EOS token's text (</s>) and on the "
        "template's turn markers (### 指示:, ### 応答:, [INST], ...). Default: the server's (on).")
    sentence_trim: bool | None = Field(
        None, description="Extension: when the length limit is hit, trim the reply back to its "
        "last sentence end (。！？!?.). Default: the server's (off).")
    return_token_ids: bool = Field(
        False, description="Extension (as vLLM's): each choice also carries `token_ids`, the "
        "reply's token ids, and `prompt_token_ids`; a stream sends the new ids per chunk and "
        "the prompt's in its first chunk.")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object (any JSON object) or json_schema (with 'strict'): "
        "the reply is constrained by vLLM's structured outputs (on /v1/completions too).")
    user: Text | None = Field(None, description="An end-user id (accepted, not used).")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if any(not s for s in self.stop_list()):
            raise ValueError("'stop' strings must be non-empty")
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError("n > 1 needs sampling: set temperature above 0 or use n = 1")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit() or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias maps token ids (as strings) to numbers in "
                                 f"[-100, 100]; got {key!r}: {bias}")
        return v

    def with_defaults(self, defaults: dict[str, Any]) -> Self:
        """The same request with a preset's sampling defaults in the fields it left unset,
        validated again like the request itself."""
        missing = {k: v for k, v in defaults.items() if k not in self.model_fields_set}
        if not missing:
            return self
        return self.model_validate({**missing, **self.model_dump(exclude_unset=True,
                                                                 by_alias=True)})

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def scoring(self) -> bool:
        """A request that scores text rather than asks for a reply (completions `echo` with
        `logprobs`, as lm-evaluation-harness's loglikelihood sends): it gets the engine's
        tokens as they are, so EOS truncation and sentence trim default to off for it."""
        return False

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return self.include_usage() and bool(self.stream_options
                                             and self.stream_options.continuous_usage_stats)

    def structured(self) -> tuple[dict[str, Any] | None, bool]:
        """(JSON schema, any JSON object) the reply must follow; (None, False) for free text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None, False
        if fmt.type == "json_object":
            return None, True
        assert fmt.json_schema is not None
        return fmt.json_schema.schema_, False

    def to_spec(self, max_tokens: int, stop: tuple[str, ...], logprobs: int | None,
                prompt_logprobs: int | None = None, eos_ids: tuple[int, ...] = ()
                ) -> SamplingSpec:
        schema, json_object = self.structured()
        return SamplingSpec(
            max_tokens=max_tokens,
            **{name: getattr(self, name) for name in PASSTHROUGH},
            top_k=max(self.top_k, 0),
            stop=stop,
            # The model's EOS ids beyond the tokenizer's, which vLLM alone would not stop on.
            stop_token_ids=tuple(dict.fromkeys((*(self.stop_token_ids or ()), *eos_ids))),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            json_schema=schema,
            json_object=json_object,
            incremental=self.stream,
        )


_UNSUPPORTED_CHAT = {
    "tools": "tool calling is not supported for these models' prompt formats; leave 'tools' out",
    "tool_choice": "tool calling is not supported for these models' prompt formats; leave "
                   "'tool_choice' out",
    "functions": "function calling is not supported; leave 'functions' out",
    "audio": "audio output is not supported; leave 'audio' out",
}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, rendered "
                                        "through the model's chat template.")
    add_generation_prompt: bool = Field(True, description="Extension: end with the reply header.")
    continue_final_message: bool = Field(
        False, description="Extension: continue the last (assistant) message instead.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred to max_tokens.")
    logprobs: bool = Field(False, description="Return the chosen tokens' log probabilities.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many "
                                     "alternatives per token.")
    tools: Any = Field(None, description="Not supported: a request with tools is refused.")
    tool_choice: Any = Field(None, description="Not supported (see tools).")
    functions: Any = Field(None, description="Not supported: a request with functions is refused.")
    audio: Any = Field(None, description="Not supported: text only.")

    @model_validator(mode="after")
    def _check_chat(self) -> Self:
        for name, why in _UNSUPPORTED_CHAT.items():
            if getattr(self, name) is not None:
                raise ValueError(why)
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="Text, a batch of texts, token ids, or a batch of token id lists."
    )
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI: 16).")
    echo: bool = Field(False, description="Return the prompt before the completion.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log probabilities of the chosen "
                                 "token and this many alternatives.")
    suffix: Text | None = Field(None, description="Not supported: insertion is refused.")

    @model_validator(mode="after")
    def _check_completion(self) -> Self:
        if self.suffix:
            raise ValueError("'suffix' (insertion) is not supported; leave it out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("'prompt' is empty: send a string or a non-empty list")
        return self

    def scoring(self) -> bool:
        return self.echo and self.logprobs is not None

    def prompts(self) -> list[str | list[int]]:
        """The batch as a list of text or token-id prompts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ResponseInputMessage(BaseModel):
    """A message of a Responses `input` list (text parts only)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = Field("message", description="Input items are messages.")
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who speaks; system and developer become the system message.")
    content: Text | list[TextPart] = Field(description="The text, or a list of text parts.")

    def as_chat(self) -> ChatMessage:
        return ChatMessage(role=self.role, content=self.content)


class TextFormat(BaseModel):
    """Responses' `text.format`: the same three kinds as chat's response_format, flattened."""

    type: Literal["text", "json_object", "json_schema"] = Field(
        "text", description="Free text, any JSON object, or JSON following `schema`.")
    name: Text = Field("response", description="The schema's name.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="With json_schema: "
                                           "the JSON Schema the reply follows.")
    strict: bool | None = Field(None, description="Accepted; the grammar always applies.")


class TextOptions(BaseModel):
    format: TextFormat = Field(default_factory=lambda: TextFormat.model_validate({}),
                               description="The reply's format.")


class ResponsesRequest(SamplingRequest):
    """POST /v1/responses, stateless: text or message input, instructions, streaming."""

    input: Text | list[ResponseInputMessage] = Field(
        description="A text (one user message) or a list of messages.")
    instructions: Text | None = Field(None, description="A system message placed first.")
    max_output_tokens: int | None = Field(None, ge=1, description="Most tokens in the reply.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: the probability mass "
                         "kept.")
    text: TextOptions | None = Field(None, description="Output options: the format.")
    store: bool | None = Field(None, description="moegi is stateless: leave it out or false.")
    previous_response_id: Text | None = Field(None, description="Not supported (stateless).")
    tools: list[Any] | None = Field(None, description="Not supported: a request with tools is "
                                    "refused.")
    tool_choice: Any = Field(None, description="Not supported (see tools).")
    metadata: dict[Text, Text] | None = Field(None, description="Echoed in the response object.")

    @model_validator(mode="after")
    def _check_responses(self) -> Self:
        if self.store:
            raise ValueError("moegi's Responses API is stateless and stores nothing: send "
                             "'store': false (or leave it out)")
        if self.previous_response_id is not None:
            raise ValueError("'previous_response_id' needs stored responses, which moegi does not "
                             "keep: send the whole conversation in 'input' instead")
        if self.tools:
            raise ValueError("tools are not supported for these models' prompt formats; leave "
                             "'tools' out")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("'input' is empty: send a text or at least one message")
        return self

    def messages(self) -> list[ChatMessage]:
        out = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, ChatMessage(role="user", content=self.input)]
        return [*out, *(m.as_chat() for m in self.input)]

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    def structured(self) -> tuple[dict[str, Any] | None, bool]:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None, False
        if fmt.type == "json_object":
            return None, True
        return fmt.schema_ or {}, False


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM's server has it: a prompt, or messages through the template."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = Field(None, description="The served model's name (optional).")
    prompt: Text | None = Field(None, description="A text to tokenize (or messages).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="A conversation, "
                                               "tokenized through the chat template.")
    add_special_tokens: bool | None = Field(
        None, description="Default: true for a prompt, false for messages (the template "
        "writes BOS itself).")
    add_generation_prompt: bool = Field(True, description="With messages: end with the reply "
                                        "header.")
    continue_final_message: bool = Field(False, description="With messages: continue the last "
                                         "message instead.")
    return_token_strs: bool = Field(False, description="Also return each token's text.")

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = Field(None, description="The served model's name (optional).")
    tokens: list[int] = Field(max_length=1 << 20, description="Token ids to turn into text.")
