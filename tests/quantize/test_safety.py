"""A quantization run never loses data or publishes a broken checkpoint, and fails early.

Each case is what a user hit: OUT equal to, inside, or around the model; an unwritable or full
output disk; SIGTERM mid-run; a merge without tokenizer files; English-only --eval text; a
checkpoint whose tensors do not read back as the model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from quantize import checkpoint, run
from quantize.cli import main as cli
from quantize.preflight import QuantizeError
from quantize.run import Options, quantize
from tests.quantize.conftest import read_tensors
from tiny.build import ensure_model

REPO = Path(__file__).resolve().parents[2]


def _copy(model: str, dest: Path) -> Path:
    shutil.copytree(ensure_model(model), dest)
    return dest


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a run gets as far as loading the model."""
    def loaded(*_: Any) -> None:
        raise AssertionError("the run loaded the model before refusing")

    monkeypatch.setattr(run, "load_model", loaded)


def test_out_is_never_the_model_inside_it_or_around_it(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)
    model = _copy("tiny-llama", tmp_path / "models" / "tiny")
    before = sorted(p.name for p in model.iterdir())
    for out, where in ((model, "is the model folder"), (model / "awq", "inside the model"),
                       (tmp_path / "models", "contains the model")):
        with pytest.raises(QuantizeError, match=where):
            quantize(Options(model=model, out=out, overwrite=True))
    assert sorted(p.name for p in model.iterdir()) == before


def test_unwritable_or_full_output_fails_before_loading(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)
    model = ensure_model("tiny-llama")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores modes: make the parent a file instead
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("not a folder")
        with pytest.raises(QuantizeError, match="cannot write into"):
            quantize(Options(model=model, out=locked / "out"))
    finally:
        if locked.is_dir():
            locked.chmod(0o700)

    class Full:
        free = 1 << 20

    monkeypatch.setattr(shutil, "disk_usage", lambda _: Full)
    with pytest.raises(QuantizeError, match="free some space"):
        quantize(Options(model=model, out=tmp_path / "out"))


def test_missing_tokenizer_files_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: Any) -> None:
    _no_loading(monkeypatch)
    model = _copy("tiny-mixtral", tmp_path / "merge")
    for f in model.glob("tokenizer*"):
        f.unlink()
    assert cli([str(model), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and "copy the tokenizer" in err
    assert "sentencepiece" not in err


def test_sigterm_leaves_no_partial_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "quantize", "tiny-text", str(out),
                             "--num-samples", "8"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "the run never reached its writing phase"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # no partial folder, no half output


def test_verify_on_english_only_and_bad_eval_files(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "awq"
    assert cli(["tiny-text", str(out), "--num-samples", "16"]) == 0
    english = tmp_path / "en.jsonl"
    english.write_text('{"text": "The capital of Japan is Tokyo. It is a large city."}\n'
                       '{"text": "Mount Fuji is the highest mountain in Japan."}\n')
    assert cli(["verify", str(out), "--original", "tiny-text", "--eval", str(english)]) == 0
    table = capsys.readouterr().out
    assert "| - |" in table  # no Japanese rows: the ja column is empty, not a KeyError
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert cli(["verify", str(out), "--original", "tiny-text", "--eval", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    empty = tmp_path / "messages.jsonl"
    empty.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    assert cli(["verify", str(out), "--original", "tiny-text", "--eval", str(empty)]) == 2
    assert "no {\"text\"" in capsys.readouterr().err


def test_a_checkpoint_far_from_the_original_is_not_published(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The gate reads the written files back: here one layer's scales are wrong on disk."""
    real = checkpoint.write_gemm

    def broken(ct_dir: Path, out: Path, *args: Any, **kw: Any) -> Any:
        report = real(ct_dir, out, *args, **kw)
        tensors = read_tensors(out)
        for key in tensors:
            if key.endswith(".scales") and ".layers.0." in key:
                tensors[key] = tensors[key] * 8  # a repacker bug, a misplaced tensor...
        for shard in out.glob("*.safetensors"):
            shard.unlink()
        from safetensors.torch import save_file

        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return report

    monkeypatch.setattr(checkpoint, "write_gemm", broken)
    monkeypatch.setattr(checkpoint, "check_repack", lambda *_: 1)  # let it reach the gate
    with pytest.raises(QuantizeError, match="not published"):
        quantize(Options(model=ensure_model("tiny-text"), out=tmp_path / "out", num_samples=8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.resume"]  # no output, no partial


def test_a_killed_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    """SIGKILL (no cleanup at all) after the first layer; the same command goes on from there,
    and the result is bit for bit the uninterrupted run's."""
    straight = tmp_path / "straight"
    assert cli(["tiny-text", str(straight), "--num-samples", "8"]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quantize", "tiny-text", str(out), "--num-samples", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "out.resume" / "progress.json"
    deadline = time.monotonic() + 300
    while not progress.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert progress.exists() and not out.exists(), "the run was not killed mid-way"
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at layer" in again.stdout
    assert not (tmp_path / "out.resume").exists()  # done: the resume state is gone
    assert not list(tmp_path.glob(".out.partial-*"))  # and so is the killed run's work folder
    a, b = read_tensors(straight), read_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("config", "requested", "chosen", "note"), [
    # SmolLM2-135M's widths (hidden 576, intermediate 1536): 128 does not divide 576.
    ({"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}, None, 64,
     "the default 128 does not divide the layer widths [576, 1536]"),
    # Swallow-MoE-4x7B (Llama-2 7B experts): the default.
    ({"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}, None, 128, None),
    ({"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32}, 32, 32, None),
    # 256 runs on the CPU plugin, not on Marlin: allowed, with a warning.
    ({"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32}, 256, 256,
     "not on vLLM's Marlin kernels"),
])
def test_group_size_is_chosen_for_the_model(config: dict[str, Any], requested: int | None,
                                            chosen: int, note: str | None) -> None:
    from quantize.preflight import choose_group_size

    size, why = choose_group_size(config, requested)
    assert size == chosen
    assert (why is None) if note is None else (why is not None and note in why)


@pytest.mark.parametrize(("requested", "message"), [
    (16, "the serving kernels run group sizes 32, 64, 128, 256 only"),  # dies at warm-up
    (512, "for this model use 32 or 64"),
    (128, "must divide the layer widths [576, 1536]; sizes that do and that the serving kernels "
          "run: 32, 64 (leave --group-size out to get 64)"),
])
def test_group_size_the_kernels_cannot_run_is_refused(requested: int, message: str) -> None:
    from quantize.preflight import choose_group_size

    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}
    with pytest.raises(QuantizeError) as err:
        choose_group_size(config, requested)
    assert message in str(err.value)
