"""The code's shape, checked: no import cycle inside src/ember, every part of
the package named in the README's Layout table, and ``import ember`` cheap (it
loads neither llama.cpp nor numpy, gguf-py, yaml or jinja2)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "ember").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ember module ``name`` imports, at the top or in a function body
    (an import in a function still runs; only TYPE_CHECKING blocks are skipped)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and "TYPE_CHECKING" in ast.unparse(t.test)
                   for b in t.body for n in ast.walk(b)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_ember() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert sum(map(len, graph.values())) > 200, "the import graph was not read"
    assert graph["ember.server.generation"] >= {"ember.server.manager"}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_part_of_the_package_is_in_the_readme_layout_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n\n", 2)[1]
    named = set(re.findall(r"`(?:ember/)?([\w./]+?)/?`", table))
    parts = {p.name.removesuffix(".py") for p in (SRC / "ember").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.name.startswith("__"))}
    missing = sorted(p for p in parts if p not in {n.removesuffix(".py") for n in named})
    assert missing == [], f"not in README's Layout table: {missing}"


def test_import_ember_loads_no_heavy_library() -> None:
    code = ("import sys, ember; heavy = [m for m in ('llama_cpp', 'numpy', 'gguf', 'yaml', 'jinja2', 'torch', 'fastapi')"
            " if m in sys.modules]; assert not heavy, heavy; assert callable(ember.convert) and callable(ember.quantize);"
            " import ember.convert, ember.quantize; assert callable(ember.convert) and callable(ember.quantize)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in the *_fixtures modules (or conftest.py), so a test
    module runs alone and reads on its own."""
    offenders = []
    for p in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{p.name}: {n}" for n in names if n.startswith("test_")]
    assert offenders == []


def _environment_reads(tree: ast.AST) -> list[ast.AST]:
    """``os.environ.get(...)``, ``os.getenv(...)`` and ``os.environ[...]`` reads."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv"):
            found.append(node)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and ast.unparse(node.value) == "os.environ":
            found.append(node)
    return found


def test_only_settings_reads_the_environment() -> None:
    settings = SRC / "ember" / "settings.py"
    assert _environment_reads(ast.parse(settings.read_text())), "the check reads no environment access"
    offenders = [f"{p.relative_to(SRC)}:{n.lineno}" for p in sorted((SRC / "ember").rglob("*.py")) if p != settings
                 for n in _environment_reads(ast.parse(p.read_text()))]
    assert offenders == [], f"read these through ember.settings: {offenders}"


def test_readme_settings_table_names_every_variable_settings_reads() -> None:
    tree = ast.parse((SRC / "ember" / "settings.py").read_text())
    read = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and re.fullmatch(r"(EMBER|HF|MODELSCOPE)_[A-Z_]+", n.value)}
    assert {"EMBER_MODELS", "EMBER_API_KEY", "EMBER_NUM_PARALLEL", "HF_TOKEN"} <= read
    table = (ROOT / "README.md").read_text().split("### Settings", 1)[1].split("\n\n", 2)[1]
    documented = {name for row in table.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`([A-Z][A-Z_]+)`", row.split("|")[1])}
    assert sorted(read - documented) == [], "add these to README's Settings table"
    assert sorted(documented - read) == [], "README's Settings table names variables settings.py does not read"
