"""The request models (serve/protocol.py) as /docs shows them: every field says what it is."""

from __future__ import annotations

from pydantic import BaseModel

from serve import protocol


def test_every_request_field_has_a_description() -> None:
    models = [c for c in vars(protocol).values() if isinstance(c, type)
              and issubclass(c, BaseModel) and c.__module__ == protocol.__name__]
    assert len(models) >= 10
    bare = [f"{m.__name__}.{name}" for m in models for name, info in m.model_fields.items()
            if not info.description]
    assert not bare, f"request fields without a description (/docs shows them bare): {bare}"
