"""The package layering (docs/design.md, "Layout"): no module reaches back up.

    scripts (dcdh_train.py, evaluation.py, search.py, demo.py, ...) and grid/ (reproduce.py's)
      -> engine/ -> methods/, models/, data/ -> utils/

Every module of a package is parsed (``ast``, nothing is imported), including imports inside
functions and relative imports, and checked against the packages it must not import.
"""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py")))
LAYERS = ("data", "models", "methods", "engine")

TOP = set(SCRIPTS) | {"grid"}  # the scripts and reproduce.py's package, which drives them

# package -> top-level names its modules must not import
FORBIDDEN = {
    "utils": set(LAYERS) | TOP,
    "models": {"methods", "engine", "data"} | TOP,
    "methods": {"engine", "data", "models"} | TOP,
    "data": {"models", "methods", "engine"} | TOP,
    "engine": TOP,
}


def modules(package):
    return sorted(glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True))


def imported_names(path, root=ROOT):
    """(line, dotted module name) of every import in ``path`` (a module under ``root``), relative
    ones made absolute; ``importlib.import_module("x")`` / ``__import__("x")`` count too."""
    rel = os.path.relpath(path, root)
    pkg = rel[:-3].split(os.sep)[:-1]           # the package holding the module
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=rel)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                prefix = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    yield node.lineno, prefix
                else:                      # from . import x, y
                    for alias in node.names:
                        yield node.lineno, f"{prefix}.{alias.name}"
            else:
                yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def violations(package):
    out = []
    for path in modules(package):
        for line, name in imported_names(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                out.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
    return out


def test_the_parser_resolves_relative_and_lazy_imports(tmp_path):
    (tmp_path / "utils" / "sub").mkdir(parents=True)
    src = tmp_path / "utils" / "sub" / "m.py"
    src.write_text("from .. import data\nfrom ..models import x\nfrom .errors import E\n"
                   "def f():\n    import importlib\n    importlib.import_module('engine.loop')\n")
    names = [n for _, n in imported_names(str(src), root=str(tmp_path))]
    assert names == ["utils.data", "utils.models", "utils.sub.errors", "importlib", "engine.loop"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_it(package):
    if not os.path.isdir(os.path.join(ROOT, package)):
        pytest.skip(f"{package}/ does not exist")
    assert modules(package), f"{package}/ has no modules"
    bad = violations(package)
    assert not bad, (f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n  " + "\n  ".join(bad))
