"""Settings: flags and MOEGI_* variables, validated at start-up, checked before the model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serve.config import ENGINE_FIELDS, Limits, Settings, check_before_load, parse


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEGI_PORT", "9001")
    monkeypatch.setenv("MOEGI_EOS_TRUNCATION", "false")
    assert parse([]).port == 9001 and parse([]).eos_truncation is False
    assert parse(["--port", "9002", "--eos-truncation"]).port == 9002
    assert parse(["--eos-truncation"]).eos_truncation is True


@pytest.mark.parametrize(("env", "value"), [
    ("MOEGI_EOS_TRUNCATION", "flase"), ("MOEGI_PORT", "80a"), ("MOEGI_PORT", "70000"),
    ("MOEGI_GPU_MEMORY_UTILIZATION", "1.5"), ("MOEGI_LOG_LEVEL", "loud"),
    ("MOEGI_MAX_PROMPTS", "0"), ("MOEGI_DTYPE", "int3"),
])
def test_bad_values_exit_naming_the_setting(monkeypatch: pytest.MonkeyPatch, env: str,
                                            value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit, match=env):
        parse([])


def test_the_api_key_is_checked_and_never_shown(monkeypatch: pytest.MonkeyPatch,
                                                capsys: Any) -> None:
    for bad, why in ((" k ", "white space"), ("", "empty")):
        with pytest.raises(SystemExit, match=why):
            parse(["--api-key", bad])
    monkeypatch.setenv("MOEGI_API_KEY", "hunter2-secret")
    settings = parse([])
    assert settings.key() == "hunter2-secret"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    assert "hunter2" not in out
    for flag in ("--max-running-requests", "--shutdown-timeout-s", "--engine-args",
                 "--stream-interval-ms", "--max-request-bytes", "--tensor-parallel-size"):
        assert flag in out  # --help lists every setting


def test_engine_args_and_passthrough() -> None:
    settings = parse(["--model", "m", "--max-model-len", "256", "--engine-args",
                      "max_num_seqs=4", "--engine-args", "kv_cache_dtype=auto"])
    args = settings.vllm_args()
    assert set(args) >= {"model", "max_model_len", "max_num_seqs", "kv_cache_dtype"}
    assert args["max_num_seqs"] == 4 and args["kv_cache_dtype"] == "auto"
    nested = parse(["--engine-args", '{"structured_outputs_config": {"backend": "guidance"}}'])
    assert nested.vllm_args()["structured_outputs_config"] == {"backend": "guidance"}
    assert set(ENGINE_FIELDS) <= set(Settings.model_fields)
    with pytest.raises(SystemExit):
        parse(["--engine-args", "{not json"])


@pytest.mark.parametrize(("args", "needle"), [
    (["--chat-template", "vicuna"], "alpaca-ja"),
    (["--chat-template", "/no/such.jinja"], "does not exist"),
    (["--preset", "nope"], "shisa-7b-v1"),
    (["--model", "/no/such/model"], "config.json"),
])
def test_checked_before_the_model_loads(args: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        check_before_load(parse(args))


def test_unknown_engine_options_are_refused_before_vllm_starts() -> None:
    from serve.vllm_engine import prepare

    with pytest.raises(ValueError, match=r"unknown vLLM engine option.*no_such_option"):
        prepare(parse(["--engine-args", "no_such_option=1"]))


def test_limits_view() -> None:
    limits = Limits.of(parse(["--max-stop", "3", "--max-logprobs", "5"]))
    assert (limits.max_stop, limits.max_logprobs) == (3, 5)


@pytest.mark.parametrize(("saved", "asked", "cpu", "served"), [
    ("float16", "auto", True, "bfloat16"),   # every AutoAWQ checkpoint, on a CPU
    ("float16", "float16", True, "float16"),  # asked for explicitly: kept
    ("bfloat16", "auto", True, "auto"),
    ("float16", "auto", False, "auto"),      # a GPU computes float16 well
])
def test_a_float16_checkpoint_is_served_in_bfloat16_on_cpus(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved: str, asked: str, cpu: bool,
        served: str) -> None:
    from vllm.platforms import current_platform

    from serve.vllm_engine import _cpu_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": saved}))
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: cpu)
    settings = parse(["--model", str(tmp_path), "--dtype", asked])
    _cpu_dtype(settings)
    assert settings.dtype == served


def test_a_refused_architecture_is_refused_before_loading(tmp_path: Path) -> None:
    """mergekit-moe's DeepSeek-MoE output needs modelling code from the hub: said, not loaded."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekForCausalLM"]}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        check_before_load(parse(["--model", str(tmp_path)]))
