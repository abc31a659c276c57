"""Server and engine settings: two dataclasses whose field docs generate the command line.

Each field's `help` metadata is its documentation and its `--flag` help; `MOEGI_<FIELD>`
environment variables give defaults (so secrets such as the API key need not sit on a command
line). Cross-field checks fail fast at start-up with a message that names the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    """What `vllm_engine.py` passes to vLLM's `AsyncEngineArgs` (names kept identical)."""

    model: str = _f("", "Model folder or hub id (default: the embedded tiny model).")
    tokenizer: str | None = _f(None, "Tokenizer folder if not the model's.")
    dtype: str = _f("auto", "Weight/activation dtype: auto, bfloat16, float16, float32.")
    max_model_len: int | None = _f(None, "Context length (prompt + completion) in tokens.")
    tensor_parallel_size: int = _f(1, "GPUs per model replica that split each layer (vLLM TP).")
    pipeline_parallel_size: int = _f(1, "Pipeline stages; with Ray these may span machines.")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = _f(
        None, "mp on one machine, ray across machines (vLLM's executor)."
    )
    gpu_memory_utilization: float = _f(0.9, "Fraction of GPU memory vLLM may use.")
    quantization: str | None = _f(None, "Quantization method (awq, awq_marlin, ...); auto if unset.")
    enforce_eager: bool = _f(False, "Skip graph compilation (faster start, slower decode).")
    seed: int = _f(0, "Engine seed for reproducible sampling.")
    max_num_seqs: int | None = _f(None, "Most sequences decoded in one batch.")
    trust_remote_code: bool = _f(False, "Allow the model folder's own Python code.")


@dataclass
class ServerConfig:
    """HTTP front end settings."""

    host: str = _f("127.0.0.1", "Address to bind.")
    port: int = _f(8000, "Port to bind.")
    served_model_name: str | None = _f(
        None, "Model id clients send and /v1/models lists (default: the model folder's name)."
    )
    chat_template: str | None = _f(
        None, "Template name from chat_templates/ (llama-2-chat, alpaca, ...) or a .jinja path."
    )
    preset: str | None = _f(
        None, "Model preset from serve/presets.json (template, system prompt, stops, sampling); "
        "matched automatically from the model name when unset; 'none' turns that off.")
    default_system_prompt: str | None = _f(
        None, "System prompt for conversations that bring none (default: the preset's).")
    eos_truncation: bool = _f(
        True, "Stop on the EOS token's text and the template's turn markers, not only the EOS id.")
    sentence_trim: bool | None = _f(
        None, "When the length limit is hit, trim replies back to the last sentence end "
        "(default: the preset's, else off).")
    api_key: str | None = _f(
        None, "Require 'Authorization: Bearer KEY' on every route but /health.", secret=True
    )
    log_level: Literal["debug", "info", "warning", "error"] = _f("info", "Log level.")


def _parse_bool(v: str) -> bool:
    return v.lower() in {"1", "true", "yes", "on"}


def _add_fields(parser: argparse._ActionsContainer, cls: type) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = "MOEGI_" + f.name.upper()
        default = os.environ.get(env, f.default)
        help_ = f.metadata["help"] + f" [env {env}]"
        kind = hints[f.name]
        if _unwrap_optional(kind) is bool:
            default = _parse_bool(default) if isinstance(default, str) else default
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_)
            continue
        base = _unwrap_optional(kind)
        choices = list(get_args(base)) if get_origin(base) is Literal else None
        conv: type = str if choices else base
        if default is not None and not isinstance(default, conv):
            default = conv(default)
        parser.add_argument(flag, type=conv, default=default, choices=choices, help=help_,
                            metavar=None if choices else f.name.upper())


def _unwrap_optional(kind: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if get_origin(kind) in (Union, UnionType):
        return next(a for a in get_args(kind) if a is not type(None))
    return kind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moegi-serve",
        description="OpenAI-compatible server for (merged, quantized) Japanese LLMs on vLLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_fields(parser.add_argument_group("server"), ServerConfig)
    _add_fields(parser.add_argument_group("engine (vLLM)"), EngineConfig)
    return parser


def parse(argv: list[str] | None = None) -> tuple[ServerConfig, EngineConfig]:
    ns = vars(build_parser().parse_args(argv))
    server = ServerConfig(**{f.name: ns[f.name] for f in dataclasses.fields(ServerConfig)})
    engine = EngineConfig(**{f.name: ns[f.name] for f in dataclasses.fields(EngineConfig)})
    if not 0 < engine.gpu_memory_utilization <= 1:
        raise SystemExit("--gpu-memory-utilization must be in (0, 1], for example 0.9")
    if server.api_key is not None and not server.api_key.strip():
        raise SystemExit("--api-key is empty: give a key or leave the option out")
    return server, engine
