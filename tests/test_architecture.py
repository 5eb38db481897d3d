"""The layering the docs promise, checked on the source: SDKs only behind backends, no import
cycles, state tables in docs/architecture.md generated from states.py."""

from __future__ import annotations

import ast
from pathlib import Path

import batchops
from batchops import states

PKG = Path(batchops.__file__).parent
SDKS = {"openai", "anthropic", "google"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module, module: str, known: frozenset[str] = frozenset()) -> set[str]:
    """Modules a tree imports. `from pkg import sub` counts as importing `pkg.sub` alone when
    `sub` is a module (a partly initialised package still hands out its submodules)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            subs = {f"{base}.{a.name}" for a in node.names}
            if subs <= known:
                found |= subs
            else:
                found.add(base)
                found |= subs & known
    return found


def test_only_backends_import_provider_sdks():
    offenders = {
        name: sorted(i for i in _imports(tree, name) if i.split(".")[0] in SDKS)
        for name, tree in _modules().items()
        if not name.startswith("batchops.backends.")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_openai_backend_imports_the_openai_sdk():
    users = sorted(
        name
        for name, tree in _modules().items()
        if any(i.split(".")[0] == "openai" for i in _imports(tree, name))
    )
    assert users == ["batchops.backends.openai"]


def test_engine_and_online_never_touch_sdk_objects():
    for name in ("batchops.engine", "batchops.online", "batchops.store", "batchops.providers"):
        text = (PKG / (name.split(".", 1)[1] + ".py")).read_text(encoding="utf-8")
        for needle in ("model_dump()", "b.output_file_id", ".errors.data", "write_to_file"):
            assert needle not in text, f"{name} touches an SDK object ({needle})"


def _module_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in mods.items():
        # Top-level imports only: a lazy import inside a function is not a cycle at import time.
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                sub = ast.Module(body=[node], type_ignores=[])
                deps |= {d for d in _imports(sub, name, frozenset(mods)) if d in mods}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        seen[n] = 1
        stack.append(n)
        for d in graph[n]:
            if seen.get(d) == 1 and not n.startswith(d + "."):
                raise AssertionError("import cycle: " + " → ".join([*stack[stack.index(d) :], d]))
            if d not in seen:
                visit(d)
        stack.pop()
        seen[n] = 2

    for n in graph:
        if n not in seen:
            visit(n)


def test_architecture_doc_has_the_generated_state_tables():
    doc = (PKG.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert states.transition_table_markdown() in doc, (
        "docs/architecture.md is out of date: paste `python -c 'from batchops.states import "
        "transition_table_markdown as t; print(t())'`"
    )
