"""A model's fingerprint covers every package its build imports or runs, so a change to any of
them rebuilds it (and the image build never copies in a model made from older sources)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_layers import imports
from tiny import build

# The modules a build runs as programs rather than imports: the quantizer's command line, which
# tiny/chat.py and tiny/real.py start as users start it.
RUNS = {name: ("quantize.cli",) for name in ("tiny-chat", "smollm2-moe-awq")}


def closure(entries: tuple[str, ...]) -> set[str]:
    graph = imports()
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += graph[mod]
    return seen


@pytest.mark.parametrize("name", sorted(build.BUILDERS))
def test_every_package_the_build_uses_is_fingerprinted(name: str) -> None:
    used = {m.split(".")[0] for m in closure(("tiny.build", *RUNS.get(name, ())))}
    assert used <= set(build.BUILDERS[name].packages), (
        f"{name} is built with {sorted(used - set(build.BUILDERS[name].packages))}, which its "
        "fingerprint leaves out")
    covered = set(build.sources(name))
    for pkg in used:
        assert any(f.is_relative_to(build.REPO / pkg) for f in covered), pkg


def test_a_change_under_awq_rebuilds_the_quantized_models(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The bug this guards against: awq/ (layout, registry) moved out of quantize/, and a change
    there no longer rebuilt tiny-chat."""
    before = {n: build.fingerprint(n) for n in ("tiny-chat", "smollm2-moe-awq", "tiny-llama")}
    registry = build.REPO / "awq" / "architectures.json"
    real = Path.read_bytes

    def changed(path: Path) -> bytes:
        data = real(path)
        return data + b" " if path == registry else data

    monkeypatch.setattr(Path, "read_bytes", changed)
    after = {n: build.fingerprint(n) for n in before}
    assert after["tiny-chat"] != before["tiny-chat"]
    assert after["smollm2-moe-awq"] != before["smollm2-moe-awq"]
    assert after["tiny-llama"] == before["tiny-llama"]  # not quantized: awq/ is not its input
