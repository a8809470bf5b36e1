"""The dependency direction of STYLE.md and DEVELOPERS.md, checked two ways:

- statically, over every import in ``trainfleet/``: module-level, function-local, and modules
  named to ``importlib.import_module`` or ``__import__``; no cycles, and each lane imports only
  the lanes it may;
- dynamically, in fresh interpreters: what importing a module actually loads (torch stays out of
  the command line and the launcher's config).
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trainfleet"
# Which lanes each lane may import (its own always). A lane is trainfleet's first sub-package
# (or module); "engine.contract" is the one part of the engine the launcher may import.
LANES = {
    "cli": {"launcher", "engine", "slurm", "bench", "models", "datasets", "train", "utils"},
    "launcher": {"engine.contract", "slurm", "utils"},
    "engine": {"utils"},
    "slurm": {"utils"},
    "bench": {"engine", "launcher", "models", "datasets", "utils"},
    "train": {"engine", "models", "datasets", "utils"},
    "models": {"utils"},
    "datasets": {"utils"},
    "utils": set(),
}
# Entry points may reach up to the command line that parses their options.
ENTRY_POINTS = {"trainfleet.train.__main__": {"cli"}}
IMPORTERS = {"import_module", "__import__"}


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _targets(node: ast.AST, base: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level:
            module = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1] + ([module] if module else []))
        named = [f"{module}.{alias.name}" for alias in node.names]
        # `from pkg import mod` imports the module, not (for the lanes) the package
        return named if all(name in modules for name in named) else [module] + named
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in IMPORTERS:
            return [node.args[0].value]
    return []


def imports(root: Path) -> list[tuple[str, int, str]]:
    """(importer, line, imported module) for every import of a trainfleet module inside ``root``,
    wherever it is written (a function body too) and however (importlib's strings too)."""
    names = module_names(root)
    package = root.name

    def resolve(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for module, path in names.items():
        base = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, base, names):
                if target.split(".")[0] != package:
                    continue
                hit = resolve(target)
                if hit and hit != module and not module.startswith(hit + ".") and hit != package:
                    found.append((module, node.lineno, hit))
    return sorted(set(found))


def lane_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def lane_violations(root: Path) -> list[str]:
    problems = []
    for importer, line, imported in imports(root):
        mine, theirs = lane_of(importer), lane_of(imported)
        if not mine or mine == theirs:
            continue
        allowed = LANES.get(mine, set()) | ENTRY_POINTS.get(importer, set())
        specific = ".".join(imported.split(".")[1:3])
        if theirs not in allowed and specific not in allowed:
            problems.append(f"{importer}:{line} imports {imported} ({mine} may import {sorted(allowed)})")
    return problems


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected sets of modules (function-local imports count)."""
    edges: dict[str, set[str]] = {m: set() for m in module_names(root)}
    for importer, _, imported in imports(root):
        edges[importer].add(imported)
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(PACKAGE) == []


def test_every_import_stays_in_its_lane():
    assert lane_violations(PACKAGE) == []


def _copy_with(tmp_path: Path, module: str, code: str) -> Path:
    root = tmp_path / "trainfleet"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    path = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
    path.write_text(path.read_text() + code)
    return root


def test_a_function_local_import_across_a_lane_is_caught(tmp_path):
    late = "\n\ndef _late():\n    from trainfleet.launcher import agent\n"
    root = _copy_with(tmp_path, "trainfleet.engine.data", late)
    assert [p.split(" (")[0] for p in lane_violations(root)] == [
        f"trainfleet.engine.data:{len((PACKAGE / 'engine/data.py').read_text().splitlines()) + 4} imports "
        "trainfleet.launcher.agent"]


def test_an_import_module_string_across_a_lane_is_caught(tmp_path):
    root = _copy_with(tmp_path, "trainfleet.slurm.job",
                      "\n\ndef _late():\n    return importlib.import_module('trainfleet.cli.launch')\n")
    assert any("trainfleet.slurm.job" in p and "trainfleet.cli.launch" in p for p in lane_violations(root))


def test_a_cycle_through_a_function_local_import_is_caught(tmp_path):
    root = _copy_with(tmp_path, "trainfleet.engine.contract",
                      "\n\ndef _late():\n    from trainfleet.engine import engine\n")
    assert any("trainfleet.engine.contract" in c and "trainfleet.engine.engine" in c for c in cycles(root))


def test_the_launcher_reads_the_engine_only_through_the_contract():
    engine_imports = {imported for importer, _, imported in imports(PACKAGE)
                      if lane_of(importer) == "launcher" and lane_of(imported) == "engine"}
    assert engine_imports == {"trainfleet.engine.contract"}


def test_worker_variables_are_named_only_in_the_contract():
    """Every TRAINFLEET_* variable of the launcher -> worker contract is spelled out in one file;
    the writers and readers use the contract's names."""
    from trainfleet.engine import contract

    named = {}
    for path in PACKAGE.rglob("*.py"):
        for name in set(re.findall(r"TRAINFLEET_[A-Z_]+", path.read_text())) & set(contract.ALL):
            named.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: files for name, files in named.items() if files != ["engine/contract.py"]} == {}
    assert set(named) == set(contract.ALL)


def modules_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module, forbidden", [
    ("trainfleet", {"torch"}),
    ("trainfleet.cli.main", {"torch", "torchvision"}),
    ("trainfleet.cli.launch", {"torch", "torchvision"}),
    ("trainfleet.launcher.config", {"torch"}),
    ("trainfleet.launcher.flags", {"torch"}),
    ("trainfleet.engine.contract", {"torch"}),
    ("trainfleet.engine.checkpoint.layout", {"torch"}),
    ("trainfleet.engine.engine", {"trainfleet.launcher", "trainfleet.slurm", "trainfleet.models",
                                  "trainfleet.datasets", "trainfleet.cli", "torchvision"}),
    ("trainfleet.slurm.nodelist", {"torch", "trainfleet.engine", "submitit"}),
    ("trainfleet.slurm.status", {"torch", "trainfleet.engine", "trainfleet.launcher", "submitit"}),
    ("trainfleet.slurm.cluster", {"torch", "trainfleet.engine", "trainfleet.launcher", "submitit"}),
    ("trainfleet.slurm.job", {"torch", "trainfleet.engine", "trainfleet.launcher", "trainfleet.cli"}),
    ("trainfleet.slurm.submit", {"torch", "trainfleet.engine", "trainfleet.launcher", "trainfleet.cli", "submitit"}),
    ("trainfleet.models", {"trainfleet.engine", "trainfleet.launcher", "torchvision"}),
    ("trainfleet.datasets", {"trainfleet.launcher", "torchvision"}),
])
def test_imports_stay_in_their_lane(module, forbidden):
    loaded = modules_after_import(module)
    assert not {m for m in loaded if m.split(".")[0] in forbidden or any(m.startswith(f + ".") or m == f
                                                                          for f in forbidden)}


def test_packages_do_not_shadow_top_level_names():
    loaded = modules_after_import("trainfleet.datasets")
    assert "datasets" not in loaded and "models" not in loaded


def test_python_m_entry_points_run():
    """``python -m trainfleet.cli`` (what a submitted job's nodes run) and ``python -m trainfleet.train``."""
    for module in ("trainfleet.cli", "trainfleet.train"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
