"""The package's imports run one way: each top-level unit imports only units below it (docs/architecture.md),
and no module imports another of the package inside a function (the way a hidden cycle is usually dodged)."""

import ast
import collections

from jaxrl_lm.config import REPO_ROOT

# Bottom to top. A unit may import the units before it, never one after it.
LAYERS = ("topology", "batch", "config", "distributed", "models", "rl", "data", "checkpoints", "envs", "generate",
          "model_policy", "eval", "train", "interop", "experiments")
PACKAGE = REPO_ROOT / "jaxrl_lm"


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "jaxrl_lm" and len(parts) > 1 else None


def imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == "jaxrl_lm":  # `from jaxrl_lm import data`
            return [f"jaxrl_lm.{a.name}" for a in node.names]
        return [node.module]
    return []


def package_imports():
    """``(edges, inner)``: unit -> units it imports; imports of the package made inside a function."""
    edges, inner = collections.defaultdict(set), []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).with_suffix("")
        source = rel.parts[1] if len(rel.parts) > 1 else None
        if source == "__init__":  # the package's own lazy public names
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for module in imported_modules(node):
                target = unit_of(module)
                if target and target != source:
                    edges[source].add(target)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{rel}.py:{n.lineno}" for n in ast.walk(fn)
                          if any(unit_of(m) or m == "jaxrl_lm" for m in imported_modules(n))]
    return edges, inner


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(LAYERS)


def test_imports_run_one_way():
    edges, _ = package_imports()
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets if LAYERS.index(b) > LAYERS.index(a)]
    assert not upward, f"imports that run upward: {upward}"
    assert "train" not in {b for a, t in edges.items() for b in t if a in ("eval", "model_policy", "generate")}
    assert not edges["train"] & {"eval", "model_policy", "envs", "experiments"}


def test_no_package_import_hides_inside_a_function():
    _, inner = package_imports()
    assert not inner, f"imports of jaxrl_lm inside functions: {inner}"
