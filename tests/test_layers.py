"""The house: which package may import which, and no import circles between modules.

Read from the source with `ast` (every import, lazy and TYPE_CHECKING ones included), so a new
arrow that breaks the layering fails here before it tangles the tree. The allowed arrows, top
to bottom (README: Files):

    serve ──► tiny ──► chat_templates        quantize ──► awq
      │                                        │  └─► tiny, chat_templates
      └─► awq, chat_templates                 vllm_plugins ──► awq

`serve` and `quantize` never import each other; what vLLM loads into its processes
(`vllm_plugins`) imports neither; `awq` (layout and registry) and `chat_templates` import none.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The project's packages: the list pyproject.toml gives setuptools (the one place it lives).
PACKAGES = tuple(p.rstrip("*") for p in tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"]["find"]["include"])
ALLOWED = {
    "serve": {"awq", "tiny", "chat_templates"},
    "quantize": {"awq", "tiny", "chat_templates"},
    "vllm_plugins": {"awq"},
    "tiny": {"chat_templates"},
    "awq": set(),
    "chat_templates": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            out[".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


def imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's `from pkg import mod` is `pkg.mod`)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name in mods and name != mod:
                    graph[mod].add(name)
                    break  # `from pkg import mod` names mod, not the package too
    return graph


def test_packages_import_only_downwards() -> None:
    wrong = sorted(f"{a} -> {b}" for a, targets in imports().items() for b in targets
                   if (pa := a.split(".")[0]) != (pb := b.split(".")[0]) and pb not in ALLOWED[pa])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_circles() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt, [*path, node]):
                return cycle
        done.add(node)
        return None

    for mod in sorted(graph):
        cycle = visit(mod, [])
        assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_module_says_what_it_is(pkg: str) -> None:
    missing = [m for m, p in _modules().items() if m.split(".")[0] == pkg
               and not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
               and p.name != "__main__.py"]
    assert not missing, f"modules without a docstring: {missing}"
