"""The house rules, checked on the source (ARCHITECTURE.md): the core never imports its
plugins, not even inside a function; no import cycles anywhere; rooms stay small.

Imports are read from every file's AST (function-level ones included) and resolved to
the module they name (``from a.b import c`` is ``a.b.c`` when that is a module, else
``a.b``). Packages ``drafts/``, ``cli/`` and ``experiments/`` install as
``apar_spec.drafts``, ``apar_spec.cli`` and ``apar_spec.experiments``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "apar_spec": "apar_spec",
    "drafts": "apar_spec.drafts",
    "cli": "apar_spec.cli",
    "experiments": "apar_spec.experiments",
}
PLUGINS = ("apar_spec.drafts", "apar_spec.cli", "apar_spec.experiments")
# The package facade: ``import apar_spec`` wires the core and the draft registry together
# (drafts/ registers its catalog with the core when imported). Declared, and the only one.
FACADES = {"apar_spec"}
MAX_LINES = 600
MAX_ROUND_LINES = 1500
# The round proper: the loop, its state, its rules and its budget. The decoding room also
# holds the cache, the accept rules, tree shapes, the speculator interface, reassembly and
# the slow reference; each is its own file under MAX_LINES.
ROUND = ("decoder.py", "state.py", "fork_rules.py", "budget.py", "clock.py")


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only: no runtime import)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def is_plugin(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PLUGINS)


def test_the_core_never_imports_its_plugins():
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in graph().items()
        if not is_plugin(m) and m not in FACADES
        for d in deps
        if is_plugin(d)
    )
    assert bad == [], "the core imports a plugin (pass it in, or register it): " + "; ".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail(tmp_path):
    """The walker sees lazy imports and relative ones (a check that cannot fail checks nothing)."""
    f = tmp_path / "x.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from apar_spec.cli import app\n"
        "def f():\n    from apar_spec.drafts import registry\n    from .tokens import AparTokens\n"
    )
    got = imports_of(
        "apar_spec.decoding.x", f, {"apar_spec.drafts.registry", "apar_spec.decoding.tokens", "apar_spec.cli.app"}
    )
    assert got == {"apar_spec.drafts.registry", "apar_spec.decoding.tokens"}  # type-only imports do not run


def test_rooms_stay_small():
    files = [*modules().values(), *sorted((ROOT / "tests").glob("*.py"))]
    long = sorted((len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(ROOT))) for p in files)
    too_long = [f"{path} ({n} lines)" for n, path in long if n > MAX_LINES]
    assert too_long == [], f"files over {MAX_LINES} lines: " + ", ".join(too_long)
    round_files = {f"apar_spec/decoding/{f}" for f in ROUND}
    round_lines = sum(n for n, path in long if path in round_files)
    assert round_lines <= MAX_ROUND_LINES, f"the decoding round has {round_lines} lines"


def test_one_home_for_the_draft_ceiling_and_the_mode_check():
    """DecodeOptions raises the adaptive ceiling to k itself; one check_mode for every caller."""
    import pytest

    from apar_spec.options import DecodeOptions, check_mode, given

    assert DecodeOptions(num_draft_tokens=24).max_draft_tokens == 24
    assert DecodeOptions(num_draft_tokens=3).max_draft_tokens == DecodeOptions.max_draft_tokens
    with pytest.raises(ValueError, match="did you mean 'apar'"):
        check_mode("apr")
    assert given(a=None, b=0, c="x") == {"b": 0, "c": "x"}
    callers = [p for p in modules().values() if "max_draft_tokens=max(" in p.read_text(encoding="utf-8")]
    assert callers == [], f"the draft ceiling is computed again in {callers}"
