"""serve/parallel.py: splits refused before loading, with the sizes that fit; CPU core binding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.parallel import bind_cpu_threads, check_split, cpu_binding

SWALLOW_4X7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                    num_key_value_heads=32, num_hidden_layers=32)


def model(tmp_path: Path, group: int | None = None, **shape: int) -> Path:
    config: dict[str, object] = {**SWALLOW_4X7B, **shape}
    if group:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                         "version": "gemm", "zero_point": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_awq_4x7b_at_group_128_takes_tp_2_but_not_4(tmp_path: Path) -> None:
    m = model(tmp_path, 128)
    check_split(m, 2, 1)
    with pytest.raises(ValueError) as err:
        check_split(m, 4, 1)  # 11008 / 4 = 2752 = 21.5 groups of 128
    msg = str(err.value)
    assert "2752" in msg and "--tensor-parallel-size 1 or 2" in msg
    assert "--pipeline-parallel-size 4" in msg and "--group-size" in msg


def test_the_embedded_models_width_at_tp_2(tmp_path: Path) -> None:
    """The field notes' SIGFPE: hidden 128 at group 128 cannot be split in two."""
    m = model(tmp_path, 128, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_hidden_layers=2)
    with pytest.raises(ValueError, match="64 of the 128 input channels of the attention o_proj"):
        check_split(m, 2, 1)
    check_split(m, 1, 2)  # pipeline parallel splits by layers: always fine
    check_split(model(tmp_path, 32, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, num_hidden_layers=2), 2, 1)


def test_bf16_splits_only_need_whole_heads_and_layers(tmp_path: Path) -> None:
    m = model(tmp_path, None, num_attention_heads=6, num_hidden_layers=2)
    check_split(m, 2, 2)
    with pytest.raises(ValueError, match="does not divide the model's 6 attention heads: use 1 or 2 or 3"):
        check_split(m, 4, 1)
    with pytest.raises(ValueError, match="more stages than the model's 2 layers"):
        check_split(m, 1, 3)


def test_cpu_binding_gives_each_rank_its_own_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_binding(2, [0, 1]) == "0|1"
    assert cpu_binding(2, list(range(8))) == "0-3|4-7"
    assert cpu_binding(2, [0, 1, 2, 5, 6, 7]) == "0-2|5-7"
    assert cpu_binding(1, [0, 2, 3]) == "0,2-3"
    with pytest.raises(ValueError, match="need at least 3 cores"):
        cpu_binding(3, [0, 1])
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|0")
    assert bind_cpu_threads(2, 1) is None  # the user's own choice stands
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    assert bind_cpu_threads(1, 1) is None
