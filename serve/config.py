"""Server settings: one validated pydantic-settings model, from flags and `MOEGI_*` variables.

Every field is a `--flag` and a `MOEGI_<FIELD>` environment variable (flags win); its description
is the `--help` text and the README's. Values are validated when the process starts, before any
model loads: `MOEGI_EOS_TRUNCATION=flase` or `--port 80a` is an error that names the setting,
and so is an unknown chat template, preset, or vLLM engine option (`check_before_load`).

The engine fields keep vLLM's `AsyncEngineArgs` names; any other engine option goes through
`--engine-args` (a JSON object, or NAME=VALUE repeated), checked against vLLM's own list before
the model loads.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict, SettingsError

import chat_templates
from awq import registry

# Fields that go to vLLM's AsyncEngineArgs under the same name.
ENGINE_FIELDS = ("model", "tokenizer", "dtype", "max_model_len", "tensor_parallel_size",
                 "pipeline_parallel_size", "distributed_executor_backend",
                 "gpu_memory_utilization", "quantization", "enforce_eager", "seed",
                 "max_num_seqs", "max_logprobs", "trust_remote_code")


class Settings(BaseSettings):
    """moegi-serve: an OpenAI-compatible server for (merged, quantized) Japanese LLMs on vLLM."""

    model_config = SettingsConfigDict(
        env_prefix="MOEGI_", cli_prog_name="moegi-serve", cli_kebab_case=True,
        cli_implicit_flags=True, cli_avoid_json=True, cli_exit_on_error=True,
        cli_hide_none_type=True, extra="ignore", validate_default=True)

    # --- HTTP front end ---
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    served_model_name: str | None = Field(
        None, description="Model id clients send and /v1/models lists (default: the model "
        "folder's name).")
    chat_template: str | None = Field(
        None, description=f"Template name from chat_templates/ ({', '.join(chat_templates.names())}) "
        "or a .jinja path.")
    preset: str | None = Field(
        None, description="Model preset from chat_templates/presets.json (template, system prompt, stops, "
        "sampling); matched from the model name when unset; 'none' turns that off.")
    default_system_prompt: str | None = Field(
        None, description="System prompt for conversations that bring none (default: the "
        "preset's).")
    eos_truncation: bool = Field(
        True, description="Stop on the EOS token's text and the template's turn markers, not "
        "only on the EOS id.")
    sentence_trim: bool | None = Field(
        None, description="When the length limit is hit, trim replies back to the last sentence "
        "end (default: the preset's, else off).")
    api_key: SecretStr | None = Field(
        None, description="Require 'Authorization: Bearer KEY' on every route but /health "
        "(prefer MOEGI_API_KEY to the flag: flags show in `ps`).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    # --- Bounds on the work one request may ask for (each refused with a 400 naming it) ---
    max_request_bytes: int = Field(2 << 20, ge=1024, description="Largest request body, bytes "
                                   "(413 past it).")
    max_prompts: int = Field(32, ge=1, description="Most prompts in one /v1/completions batch.")
    max_choices: int = Field(64, ge=1, description="Most choices per request: n times the "
                             "number of prompts.")
    max_stop: int = Field(16, ge=0, description="Most stop strings per request.")
    max_stop_length: int = Field(256, ge=1, description="Longest stop string, characters.")
    max_stop_token_ids: int = Field(64, ge=0, description="Most stop_token_ids per request.")
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries per request.")
    # --- Overload and shutdown ---
    max_running_requests: int = Field(
        256, ge=1, description="Requests admitted to the engine at once; more wait in line.")
    max_waiting_requests: int = Field(
        512, ge=0, description="Requests that may wait for a slot; past it: 429 with Retry-After.")
    max_wait_s: float = Field(
        30.0, gt=0, description="Longest wait for a slot; past it: 503 with Retry-After (the "
        "engine is saturated).")
    shutdown_timeout_s: float = Field(
        20.0, ge=0, description="On SIGTERM, time in-flight requests get to finish; the rest "
        "end with an error chunk. Keep it under the orchestrator's grace period (Kubernetes: "
        "30 s).")
    stream_interval_ms: float = Field(
        20.0, ge=0, description="Least time between two chunks of one stream: tokens that come "
        "sooner travel together in the next chunk (one socket write instead of several: writes "
        "are most of the front end's CPU under load). Applies while two or more streams are "
        "open; the first chunk is never held. 0: a chunk per engine step.")
    engine_stall_s: float = Field(
        60.0, gt=0, description="An engine that neither finishes a step nor computes (spends "
        "CPU) this long while it has requests is hung: /health answers 503.")

    # --- vLLM engine (AsyncEngineArgs names) ---
    model: str = Field("", description="Model folder or hub id (default: the embedded tiny-chat).")
    tokenizer: str | None = Field(None, description="Tokenizer folder if not the model's.")
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half", "float"] = Field(
        "auto", description="Weight and activation dtype.")
    max_model_len: int | None = Field(None, ge=16, description="Context length (prompt + "
                                      "completion) in tokens.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica that split "
                                      "each layer (vLLM TP).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages; with Ray these "
                                        "may span machines.")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None, description="mp on one machine, ray across machines (vLLM's executor).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory "
                                          "vLLM may use.")
    quantization: str | None = Field(None, description="Quantization method (awq, awq_marlin, "
                                     "...); read from the checkpoint when unset.")
    enforce_eager: bool = Field(False, description="Skip graph compilation (faster start, "
                                "slower decode).")
    seed: int = Field(0, description="Engine seed for reproducible sampling.")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences decoded in one "
                                     "batch.")
    max_logprobs: int = Field(20, ge=0, description="Most top_logprobs / logprobs a request may "
                              "ask for.")
    trust_remote_code: bool = Field(False, description="Allow the model folder's own Python code.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other vLLM engine option (AsyncEngineArgs "
        "names): a JSON object, or NAME=VALUE repeated (VALUE read as JSON where it is), e.g. "
        "--engine-args kv_cache_dtype=fp8 --engine-args max_num_batched_tokens=4096.")

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            key = v.get_secret_value()
            if not key.strip():
                raise ValueError("the API key is empty: give a key or leave the option out")
            if key != key.strip():
                raise ValueError("the API key starts or ends with white space, which no client "
                                 "sends: remove it")
        return v

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        """NAME=VALUE gives strings: "4" is the number 4, "true" is True, "fp8" stays text."""
        out = {}
        for name, value in v.items():
            if isinstance(value, str):
                with contextlib.suppress(json.JSONDecodeError):
                    value = json.loads(value)
            out[name.strip().replace("-", "_")] = value
        return out

    def key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def vllm_args(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's AsyncEngineArgs."""
        args = {name: getattr(self, name) for name in ENGINE_FIELDS}
        return {**{k: v for k, v in args.items() if v is not None}, **self.engine_args}


def default(name: str) -> Any:
    """A setting's default: the one place defaults live is the Settings class above."""
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class Limits:
    """The per-request bounds the serving layer enforces (a view of Settings; by default, its
    defaults)."""

    max_prompts: int = default("max_prompts")
    max_choices: int = default("max_choices")
    max_stop: int = default("max_stop")
    max_stop_length: int = default("max_stop_length")
    max_stop_token_ids: int = default("max_stop_token_ids")
    max_logit_bias: int = default("max_logit_bias")
    max_logprobs: int = default("max_logprobs")

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls)})


def check_before_load(settings: Settings) -> None:
    """What can be checked before the engine starts: template, preset, paths, the parallel
    split, engine options.

    Raises ValueError with a message that names the fix.
    """
    from chat_templates.presets import named
    from serve.parallel import check_split

    if settings.chat_template:
        chat_templates.load(settings.chat_template)
    if settings.preset and settings.preset != "none":
        named(settings.preset)
    for name in ("model", "tokenizer"):
        value = getattr(settings, name)
        if value and (value.startswith((".", "/", "~")) or Path(value).exists()):
            if not (Path(value).expanduser() / "config.json").is_file() and name == "model":
                raise ValueError(f"--model {value}: no config.json there; pass a model folder "
                                 "(or a hub id)")
            if not Path(value).expanduser().exists():
                raise ValueError(f"--{name} {value}: no such folder")
    if settings.model and (Path(settings.model).expanduser() / "config.json").is_file():
        model_dir = Path(settings.model).expanduser()
        refused = registry.refusal(json.loads((model_dir / "config.json").read_text()))
        if refused:
            raise ValueError(refused)
        check_split(model_dir, settings.tensor_parallel_size, settings.pipeline_parallel_size)


def parse(argv: list[str] | None = None) -> Settings:
    """Flags and environment -> Settings; a bad value exits 2 with the setting's name."""
    try:
        return CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        raise SystemExit(f"moegi-serve: invalid settings: {exc} ({exc.__cause__})") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            flag = "--" + name.replace("_", "-")
            lines.append(f"  {flag} / MOEGI_{name.upper()}: {err['msg']}")
        raise SystemExit("moegi-serve: invalid settings\n" + "\n".join(lines)) from None
