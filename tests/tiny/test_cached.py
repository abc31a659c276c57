"""tiny/cached.py: the image build's question, "is the default model built for these
sources?", answered from this cache or copied from another (a host's, mounted into the build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny.build import fingerprint
from tiny.cached import main


def test_copied_only_when_built_from_the_same_sources(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOEGI_CACHE", str(tmp_path / "image"))
    host = tmp_path / "host"
    stale = host / "tiny-chat-000000000000"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    assert main(["tiny-chat", str(host)]) == 1  # another fingerprint: built in the image instead
    assert "not built for these sources" in capsys.readouterr().err
    same = host / f"tiny-chat-{fingerprint('tiny-chat')}"
    same.mkdir()
    (same / "config.json").write_text("{}")
    assert main(["tiny-chat", str(host)]) == 0
    copied = tmp_path / "image" / "models" / same.name
    assert capsys.readouterr().out.strip() == str(copied) and (copied / "config.json").is_file()
    assert main(["tiny-chat"]) == 0  # now in this cache
