"""The package's modules import each other without cycles, counting the imports inside
functions (a cycle hidden in a function still ties two modules together), and the public
namespace holds only the public API."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import lottery_ext

ROOT = Path(lottery_ext.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = ("lottery_ext", *f.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    out.add(sub)
                elif base in modules and alias.name != "_core":  # _core: the extension
                    out.add(base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out - {name}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert graph["lottery_ext.experiments.training"]  # the walk sees real edges


def test_public_namespace_is_the_api():
    # apart from its subpackages and modules, what the package holds is its API
    public = {n for n in dir(lottery_ext) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(lottery_ext, n), types.ModuleType)}
    assert public - modules == set(lottery_ext.__all__) - modules - {"__version__"}
    assert set(lottery_ext.__all__) <= set(dir(lottery_ext))
    assert not {"annotations", "torch"} & public
    for name in lottery_ext.__all__:
        assert name in lottery_ext.__doc__, f"{name} missing from the package docstring"
