"""rung's modules import one way (docs/style.md): nothing imports the command-line entry point, and
the weights/ package is a DAG of module-level imports (the GGUF reader, its config and its key map
never import the loader back)."""

from __future__ import annotations

import ast
from pathlib import Path

import rung

ROOT = Path(rung.__file__).parent


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(module imported, line, whether at module level) for every import in the file, relative ones
    resolved; ``from pkg import name`` counts as importing ``pkg.name`` too (it may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    package = list(path.relative_to(root.parent).parent.parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..cli import main
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            out.append((base, node.lineno, id(node) in top))
            out += [(f"{base}.{a.name}", node.lineno, id(node) in top) for a in node.names]
    return out


def _cli_imports(root: Path) -> list[str]:
    return sorted({f"{path.relative_to(root.parent)}:{line}"
                   for path in root.rglob("*.py") if path.name != "__main__.py" and path != root / "cli.py"
                   for name, line, _ in _imports(path, root) if name == "rung.cli" or name.startswith("rung.cli.")})


def test_no_module_but_dunder_main_imports_the_cli():
    assert _cli_imports(ROOT) == []


def test_the_scan_finds_an_import_of_the_cli_inside_a_function(tmp_path):
    package = tmp_path / "rung" / "commands"
    package.mkdir(parents=True)
    (package / "late.py").write_text("def run():\n    from ..cli import main\n")
    (package / "eager.py").write_text("import rung.cli\n")
    assert _cli_imports(tmp_path / "rung") == ["rung/commands/eager.py:1", "rung/commands/late.py:2"]


def test_weights_imports_are_a_dag_of_module_level_imports():
    weights = ROOT / "weights"
    modules = {f"rung.weights.{p.stem}" for p in weights.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(weights.glob("*.py")):
        me = f"rung.weights.{path.stem}"
        for name, line, at_top in _imports(path):
            target = ".".join(name.split(".")[:3])
            if target in modules and target != me:
                assert at_top, f"{path.name}:{line} imports {target} inside a function (an import cycle dodged?)"
                graph.setdefault(me, set()).add(target)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module not in done:
            for target in graph.get(module, ()):
                visit(target, path + (module,))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
