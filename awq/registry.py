"""The architecture registry (`architectures.json`), keyed by architecture class: one entry per
family of models says everything moegi's stages need to know about its layout.

Per family: the AWQ mappings (which activation is smoothed, which linears absorb the inverse
scale), what stays 16-bit (for llm-compressor, for config.json's readers, and as a regex over
checkpoint tensor names), the rename onto the layout AutoAWQ readers load, the experts', the
router's and the shared expert's tensor names, transformers' module names, the config.json keys
for the expert counts, and the card's words; and the architectures refused, with the reason. The
quantize stage (recipe, preflight, the RTN baseline, the card, the layer-by-layer reader) reads
it from here, and so a new architecture is one JSON entry (tests/awq/test_registry.py adds a
family that way, and tests/integration/test_families.py quantizes and serves one from a JSON
file alone). Pure Python: the serving side may import it without the quantize stage.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY = Path(__file__).with_name("architectures.json")
REGISTRY_ENV = "MOEGI_ARCHITECTURES"


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Experts:
    """How a MoE family names one expert's tensors, in any layout its checkpoints use, and the
    names transformers 5's own modules give the router and the fused experts."""

    pattern: re.Pattern[str]  # groups: the expert index, the projection's name
    roles: dict[str, str]  # projection name -> "gate", "up" or "down"
    router: str  # the router's weight in checkpoints, relative to the layer
    count_keys: tuple[str, ...]  # config.json: number of experts (the first key present)
    per_token_key: str  # config.json: experts per token
    modules: dict[str, str]  # transformers' names: "router", "gate_up" [E, 2I, H], "down" [E, H, I]

    def match(self, name: str) -> tuple[int, str] | None:
        """(expert, role) of a layer-relative tensor name, or None when it is not an expert's."""
        m = self.pattern.match(name)
        return (int(m.group(1)), self.roles[m.group(2)]) if m else None

    def count(self, config: dict[str, Any]) -> int:
        for key in self.count_keys:
            if config.get(key):
                return int(config[key])
        raise KeyError(f"config.json has none of {', '.join(self.count_keys)} (the number of "
                       "experts)")


@dataclass(frozen=True)
class ArchSpec:
    architecture: str
    family: str  # a family of the registry ("dense", "mixtral", "qwen2-moe", ...)
    mappings: tuple[tuple[str, tuple[str, ...]], ...]  # (smooth, balance layers)
    ignore: tuple[str, ...]
    modules_to_not_convert: tuple[str, ...] | None
    rename: tuple[tuple[str, str], ...]
    kept: re.Pattern[str]  # checkpoint tensors that stay 16-bit
    kept_text: str  # the same, in the model card's words
    card_text: str = ""  # the family's sentence in the card
    experts: Experts | None = field(default=None)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    def keeps(self, name: str) -> bool:
        """Whether the quantizer leaves this tensor (a checkpoint or layer-relative name) 16-bit."""
        return bool(self.kept.search(name))

    def awq_mappings(self) -> list[Any]:
        """llm-compressor `AWQMapping` objects (imported lazily: quantize env only)."""
        from llmcompressor.modifiers.transform.awq import AWQMapping

        return [AWQMapping(smooth, list(balance)) for smooth, balance in self.mappings]

    def original_name(self, name: str) -> str:
        """llm-compressor's tensor name -> the original checkpoint's (e.g. experts.E.w1)."""
        for pattern, repl in self.rename:
            name = re.sub(pattern, repl, name)
        return name


def registry_path() -> Path:
    """The registry file: `MOEGI_ARCHITECTURES` names another (a family added as data, tried
    before it is shipped), else the one beside this module."""
    return Path(os.environ.get(REGISTRY_ENV) or REGISTRY)


def _registry(path: Path | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path or registry_path()).read_text(encoding="utf-8"))
    return data


def supported(path: Path | None = None) -> list[str]:
    return sorted(_registry(path)["architectures"])


def lookup(architecture: str, path: Path | None = None) -> ArchSpec:
    """The spec for an architecture class; refused and unknown ones fail saying why."""
    data = _registry(path)
    if reason := refusal({"architectures": [architecture]}, path):
        raise UnsupportedArchitecture(reason)
    entry = data["architectures"].get(architecture)
    if entry is None:
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} has no AWQ mapping; supported: "
            f"{', '.join(supported(path))} (add one to awq/architectures.json)")
    fam = data["families"][entry["family"]]
    maps = tuple((m["smooth"], tuple(m["balance"])) for m in data["mappings"][entry["mappings"]])
    mtnc = fam["modules_to_not_convert"]
    experts = Experts(re.compile(fam["experts"]["pattern"]), dict(fam["experts"]["roles"]),
                      fam["router"], tuple(fam["config"]["experts"]),
                      fam["config"]["per_token"], dict(fam["modules"])
                      ) if "experts" in fam else None
    return ArchSpec(architecture, entry["family"], maps, tuple(fam["ignore"]),
                    tuple(mtnc) if mtnc is not None else None, tuple(fam["rename"].items()),
                    re.compile(fam["kept"]), fam["kept_text"], fam.get("card", ""), experts)


def refusal(config: dict[str, Any], path: Path | None = None) -> str | None:
    """Why moegi declines this model (a parsed config.json) before loading it, or None: the
    server serves architectures the registry does not map (vLLM knows them), but not these."""
    archs = config.get("architectures") or []
    refused: dict[str, str] = _registry(path).get("refused", {})
    return next((f"architecture {a!r} is not supported: {refused[a]}" for a in archs
                 if a in refused), None)


def for_config(config: dict[str, Any], path: Path | None = None) -> ArchSpec:
    """The spec for a model's parsed config.json."""
    archs = config.get("architectures") or ["<none in config.json>"]
    return lookup(archs[0], path)
