"""The layering the architecture promises (ARCHITECTURE.md), read from the code itself.

Every import counts, including the ones inside functions: a cycle hidden behind a local import is still
a cycle for anyone reading or moving the code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opsd_core", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (anywhere in the file), as dotted names; ours resolved to modules."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(name, path, known) if m in known and m != name}
            for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_library_never_imports_the_orchestrator() -> None:
    known = modules()
    offenders = {
        name: sorted(m for m in imports_of(name, path, known) if m.split(".")[0] in {"flows", "prefect"})
        for name, path in known.items() if name.startswith("opsd_core")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_components_do_not_import_stages() -> None:
    """Stages call components, never the other way round."""
    edges = graph()
    upward = {name: sorted(m for m in deps if m.startswith("opsd_core.stages"))
              for name, deps in edges.items()
              if name.startswith("opsd_core") and not name.startswith("opsd_core.stages")}
    assert {k: v for k, v in upward.items() if v} == {}


def test_backends_do_not_import_the_algorithm() -> None:
    """The algorithm plugs back-ends in; a back-end knows nothing of losses, teachers or the loop."""
    edges = graph()
    upward = {name: sorted(m for m in deps if m.startswith(("opsd_core.algorithm", "opsd_core.stages")))
              for name, deps in edges.items() if name.startswith("opsd_core.backends")}
    assert {k: v for k, v in upward.items() if v} == {}


def test_losses_import_torch_only() -> None:
    known = modules()
    deps = imports_of("opsd_core.algorithm.losses", known["opsd_core.algorithm.losses"], known)
    ours = {d for d in deps if d.split(".")[0] in PACKAGES}
    assert ours <= {"opsd_core.config"}, ours  # config only for type hints of the spec's constructor


def test_stages_load_no_prefect() -> None:
    code = ("import sys\n"
            "import opsd_core.stages.prepare, opsd_core.stages.train, opsd_core.stages.evaluate, "
            "opsd_core.stages.register, opsd_core.stages.promote, opsd_core.stages.status\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
