"""The package's layout rules, checked by walking its imports (ast), so they stay true as it grows.

* no import cycle among the package's modules (lazy imports inside functions count too: a cycle
  broken by a local import is still a cycle in the design);
* `policies/` and `models/` import nothing from `data/` (the contract types live in shapes.py);
* no library module imports `cli/` (the command line is the outermost layer);
* the robot side (serving/client.py, serving/protocol.py, chunking.py, execution.py) imports no torch;
* `envs/` never imports the policy package;
* no library function is longer than 100 lines, and `train()` is at most 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion_policy", "envs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module that `name` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            # the longest known module that the target names (a symbol resolves to its module)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if any. A package's __init__ is left out as a target: importing a submodule
    runs its package's __init__, but that is Python's mechanics, not a dependency of the design."""
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n in packages:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("diffusion_policy.policies", "diffusion_policy.data"),
        ("diffusion_policy.models", "diffusion_policy.data"),
        ("diffusion_policy", "diffusion_policy.cli"),  # every library module
        ("envs", "diffusion_policy"),
    ],
)
def test_layer_does_not_import(layer, forbidden):
    bad = []
    for m, deps in _graph().items():
        if not (m == layer or m.startswith(layer + ".")):
            continue
        if forbidden == "diffusion_policy.cli" and m.startswith("diffusion_policy.cli"):
            continue  # the CLI may import itself
        bad += [f"{m} imports {d}" for d in deps if d == forbidden or d.startswith(forbidden + ".")]
    assert not bad, "; ".join(sorted(bad))


@pytest.mark.parametrize(
    "module",
    [
        "diffusion_policy.serving.client",
        "diffusion_policy.serving.protocol",
        "diffusion_policy.chunking",
        "diffusion_policy.execution",
    ],
)
def test_robot_side_imports_no_torch(module):
    path = _modules()[module]
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "torch"], f"{module} imports torch"
    # and nothing of the package that does
    graph = _graph()
    assert graph[module] <= {
        "diffusion_policy.serving.protocol",
        "diffusion_policy.chunking",
        "diffusion_policy.execution",
        "diffusion_policy.errors",
    }, f"{module} imports {graph[module]}"


def function_lengths() -> list[tuple[int, str]]:
    """(lines, 'path:line name') for every function and method of the library, longest first."""
    rows = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                rows.append((node.end_lineno - node.lineno + 1, where))
    return sorted(rows, reverse=True)


def test_no_library_function_over_100_lines():
    rows = function_lengths()
    print("\nthe 10 longest library functions:\n" + "\n".join(f"{n:4d}  {w}" for n, w in rows[:10]))
    assert rows[0][0] <= 100, f"{rows[0][1]} is {rows[0][0]} lines"
    train = [
        n
        for n, w in rows
        if w.startswith("diffusion_policy/training/loop.py") and w.endswith(" train")
    ]
    assert train and train[0] <= 80, f"train() is {train} lines"
