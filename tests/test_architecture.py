"""The layering the architecture promises (ARCHITECTURE.md), read from the code itself.

Every import counts, including the ones inside functions: a cycle hidden behind a local import is still
a cycle for anyone reading or moving the code.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opsd_core.backends.capabilities import ISA_CAPS, ISA_ENV

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opsd_core", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(node: ast.AST, name: str, is_pkg: bool, known: dict[str, Path]) -> list[str]:
    """What one import statement of module ``name`` imports, as dotted names (relative imports resolved; a name
    from one of our modules resolved to that module when it is one); [] for any other node."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = name.split(".") if is_pkg else name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (anywhere in the file), as dotted names; ours resolved to modules."""
    is_pkg = path.name == "__init__.py"
    return {t for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            for t in imported(node, name, is_pkg, known)}


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


# -- the layers, bottom up ----------------------------------------------------------------------
# A module imports only from its own rank or below. Ranks as the code has them (ARCHITECTURE.md, "Layers"):
# the base modules; the models and the data (each on its own: neither imports the other); the back-ends
# (they use models/lora.py's LoRA utilities); the algorithm and the evaluation (one rank: the diagnosis judges
# answers with evaluation.metrics, which formats prompts with algorithm.prompts, and evaluation/opsd_lm.py
# samples with algorithm.rollout); the registry (its gate and card read evaluation's bootstrap, metrics and
# tasks); the stages; flows/; flows/cli.py, the app entry above the flows it starts.
RANKS = {
    "opsd_core": 0, "opsd_core.config": 0, "opsd_core.errors": 0, "opsd_core.io": 0, "opsd_core.offline": 0,
    "opsd_core.checkpoint": 0, "opsd_core.layout": 0, "opsd_core.net": 0,
    "opsd_core.models": 1, "opsd_core.data": 1,
    "opsd_core.backends": 2,
    "opsd_core.algorithm": 3, "opsd_core.evaluation": 3,
    "opsd_core.registry": 4,
    "opsd_core.stages": 5,
    "flows": 6,
    "flows.cli": 7,
}
# imports between two different groups of one rank: the base modules import one another (config reads
# errors and io, layout reads config, ...), and the algorithm and the evaluation do (no cycle: test above)
SAME_RANK = {frozenset({"opsd_core.algorithm", "opsd_core.evaluation"})}


def layer_of(module: str) -> str | None:
    """The entry of RANKS that ``module`` belongs to (the longest prefix; ``opsd_core`` is the package's own
    ``__init__`` only, so a new top-level module must be given its rank), or None."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RANKS and (prefix != "opsd_core" or module == prefix):
            return prefix
    return None


def test_every_module_has_a_layer() -> None:
    assert sorted(m for m in modules() if layer_of(m) is None) == []


def test_modules_import_only_their_own_layer_or_below() -> None:
    edges = graph()
    wrong = []
    for name, deps in sorted(edges.items()):
        mine = layer_of(name)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if mine is None or theirs is None or mine == theirs:
                continue
            if RANKS[theirs] > RANKS[mine] or (
                    RANKS[theirs] == RANKS[mine] and RANKS[mine] != 0 and frozenset({mine, theirs}) not in SAME_RANK):
                wrong.append(f"{name} (rank {RANKS[mine]}) imports {dep} (rank {RANKS[theirs]})")
    assert wrong == [], "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import() -> None:
    assert layer_of("opsd_core.backends.fused_lora") == "opsd_core.backends"
    assert layer_of("flows.cli") == "flows.cli" and layer_of("flows.retrain") == "flows"
    assert layer_of("opsd_core") == "opsd_core" and layer_of("opsd_core.new_module") is None
    assert RANKS[layer_of("opsd_core.models.lora")] < RANKS[layer_of("opsd_core.backends.engine")]
    assert frozenset({"opsd_core.models", "opsd_core.data"}) not in SAME_RANK


# -- function-local imports: only with a reason ---------------------------------------------------
HEAVY = "heavy: would slow a command that does not need it"
# (module, what it imports inside a function: the top-level package, or the module of ours) -> why.
# flows/cli.py's _dispatch imports each command's stage or flow when it runs (CLI dispatch): not listed.
LOCAL_IMPORTS = {
    ("opsd_core.backends.capabilities", "torch"):
        f"{HEAVY}: every `opsd` command imports this module where it starts (apply_isa_cap); `opsd status`, "
        "`promote` and friends never load torch (tests/test_run_cli.py)",
    ("opsd_core.data.bundled", "reasoning_gym"):
        f"{HEAVY}: ~2.5 s, only `opsd data generate`; training and evaluation import opsd_core.data",
    ("opsd_core.models.tiny", "reasoning_gym"):
        f"{HEAVY}: ~2.5 s, only when the tiny model's tokenizer is built; every model load imports this module",
    ("opsd_core.models.lora", "peft"):
        f"{HEAVY}: ~4.4 s; the back-ends import this module, and evaluating the base, the diagnosis and full "
        "fine-tuning never wrap a model",
    ("opsd_core.models.sources", "peft"): f"{HEAVY}: ~4.4 s, only to load an adapter candidate",
    ("opsd_core.evaluation.harness", "lm_eval"):
        f"{HEAVY}: its task manager ~2.7 s and HF model ~1.1 s, only when a model is evaluated (a cached base "
        "is not), each model class only for its eval.backend",
    ("opsd_core.evaluation.harness", "opsd_core.evaluation.opsd_lm"):
        f"{HEAVY}: opsd_lm imports lm-eval's HF model at its top; only eval.backend opsd needs it",
    ("opsd_core.registry.card", "matplotlib"):
        f"{HEAVY}: ~0.6 s, only to draw; flows/artifacts.py (the `opsd run` process) imports the card's tables",
    ("opsd_core.registry.live", "mlflow"):
        f"{HEAVY}: the train stage imports this module; only a training under the flow logs live metrics",
    ("flows.doctor", "dvc"):
        f"{HEAVY}: ~1 s, only the DVC remote's probe; `opsd run` imports this module to check the Prefect API",
    ("opsd_core.registry.reach", "sqlalchemy"):
        f"{HEAVY}: ~0.4 s, only to probe a database tracking URI; the run's preflight of a server or a SQLite "
        "file never needs it",
    ("opsd_core.registry.pyfunc_model", "opsd_core.registry.pyfunc_serve"):
        f"{HEAVY}: torch and transformers, ~4 s; MLflow runs pyfunc_model when `opsd register` saves a version "
        "(models from code), and only loading a version needs the model",
    ("opsd_core.registry.store", "mlflow"):
        f"{HEAVY}: ~3.7 s; `opsd status` reads an SQLite store through registry/sqlite_read.py without MLflow",
}


def local_imports() -> list[tuple[str, str, str, int, str]]:
    """(module, enclosing function, what it imports, line, path) for every import inside a function."""
    known = modules()
    found = []
    for name, path in known.items():
        is_pkg = path.name == "__init__.py"
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                for target in imported(node, name, is_pkg, known):
                    ours = target.split(".")[0] in PACKAGES
                    what = (target if target in known else ".".join(target.split(".")[:-1])) if ours else \
                        target.split(".")[0]
                    found.append((name, fn.name, what, node.lineno, str(path.relative_to(ROOT))))
    return sorted(set(found))


def test_function_local_imports_have_a_reason() -> None:
    found = local_imports()
    dispatch = {(m, f) for m, f, what, _, _ in found
                if m == "flows.cli" and f == "_dispatch" and what.split(".")[0] in PACKAGES}
    unlisted = [f"{path}:{line}: {what} imported inside {fn}() has no reason: import it at the top, or add "
                f"({module!r}, {what!r}) to LOCAL_IMPORTS with one"
                for module, fn, what, line, path in found
                if (module, what) not in LOCAL_IMPORTS and (module, fn) not in dispatch]
    assert unlisted == [], "\n".join(unlisted)
    stale = sorted(set(LOCAL_IMPORTS) - {(m, what) for m, _, what, _, _ in found})
    assert stale == [], f"no longer imported inside a function: remove from LOCAL_IMPORTS: {stale}"


# -- process settings: applied where a process starts, never on import ------------------------------
def _env_without_isa() -> dict[str, str]:
    caps = {k for level in ISA_CAPS.values() for k in level}
    return {k: v for k, v in os.environ.items() if k not in caps and k != ISA_ENV}


def test_importing_opsd_sets_no_library_caps() -> None:
    """OPSD_CPU_ISA reaches torch, oneDNN and MKL from the process's entry point, not from an import."""
    code = ("import json, os, sys\n"
            "import opsd_core, opsd_core.backends.capabilities, opsd_core.backends.plan, opsd_core.config\n"
            "print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))")
    out = subprocess.run([sys.executable, "-c", code, *ISA_CAPS["avx2"]], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**_env_without_isa(), "OPSD_CPU_ISA": "avx2"})
    assert set(json.loads(out.stdout.strip().splitlines()[-1]).values()) == {None}, out.stdout


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="OPSD_CPU_ISA caps x86 only")
def test_the_opsd_command_applies_the_isa_cap_before_torch_runs(tmp_path: Path) -> None:
    """`opsd` (flows.cli.main; torchrun's ranks run it too) sets the libraries' caps first; torch then runs at
    most its AVX2 kernels (on an AVX-512 machine this is the real check; on an AVX2 one the caps are)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    code = ("import json, os\n"
            "from flows.cli import main\n"
            "from opsd_core.backends.capabilities import ISA_CAPS\n"
            "rc = main(['status', '--set', 'no_such_section.key=1'])  # a setting error: exits before any work\n"
            "import torch\n"
            "print(json.dumps({'rc': rc, 'torch_cpu': torch.backends.cpu.get_cpu_capability(),\n"
            "                  'caps': {k: os.environ.get(k) for k in ISA_CAPS['avx2']}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**_env_without_isa(), "OPSD_CPU_ISA": "avx2", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["rc"] == 2 and record["caps"] == ISA_CAPS["avx2"], record
    assert record["torch_cpu"] in ("AVX2", "DEFAULT"), record


# -- tests and benchmarks: helpers in one place ---------------------------------------------------------
def _imported_modules(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return out


def test_test_modules_import_no_other_test_module_and_benchmarks_no_tests() -> None:
    """Shared helpers live in tests/conftest.py (fixtures), tests/support.py, tests/projects.py, tests/servers.py
    (real servers on loopback) and tests/faults/;
    a test module imported by another would run its tests twice over and tie the two together. Benchmarks
    import nothing from the tests (the fresh clone both use is benchmarks/common.py's)."""
    tests_dir = ROOT / "tests"
    local = {p.stem for p in tests_dir.glob("*.py")} | {p.name for p in tests_dir.iterdir() if p.is_dir()}
    wrong = []
    for path in sorted(tests_dir.glob("test_*.py")):
        for line, name in _imported_modules(path):
            parts = name.split(".")
            if parts[0] in local:  # a bare import through the tests folder on sys.path: say tests.<module>
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} (import it as tests.{name})")
            elif parts[0] == "tests" and len(parts) > 1 and parts[1].startswith("test_"):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} is a test module")
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for line, name in _imported_modules(path):
            if name.split(".")[0] == "tests":
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name}: benchmarks import nothing from the tests")
    assert wrong == [], "\n".join(wrong)
