"""The layering of cvae/ (README, "Inside"): import-linter's contracts hold, there is no import
cycle among cvae's modules, no argparse Namespace is built outside the command layer, and
imports of cvae modules inside functions stay the exception."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cvae"
#: Function-local imports of cvae modules allowed in all (the issue's bound).
MAX_LOCAL_IMPORTS = 10


def modules():
    """{dotted module name: (path, AST)} of every .py file of the cvae package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return found


def cvae_imports(tree, name, is_package=False):
    """[(imported cvae module, inside a function?)] of one module."""
    out = []
    package = name if is_package else name.rpartition(".")[0]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function) for a in child.names if a.name.startswith("cvae"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - child.level + 1]
                                    + ([base] if base else []))
                if base == "cvae":  # from cvae import x: x may be a module
                    out.extend((f"cvae.{a.name}", in_function) for a in child.names)
                elif base.startswith("cvae"):
                    out.append((base, in_function))
            visit(child, local)

    visit(tree, False)
    return out


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_import_cycle_among_cvae_modules():
    found = modules()
    graph = {name: set() for name in found}
    for name, (path, tree) in found.items():
        for target, _ in cvae_imports(tree, name, path.name == "__init__.py"):
            # `from cvae.cli import x` imports cvae.cli; a name that is no module is dropped
            while target and target not in graph:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_argparse_namespaces_only_in_the_command_layer():
    for name, (path, tree) in modules().items():
        if name.startswith("cvae.cli"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "Namespace":
                raise AssertionError(f"{path}:{node.lineno} uses argparse.Namespace")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                assert "argparse" not in names and getattr(node, "module", None) != "argparse", \
                    f"{path}:{node.lineno} imports argparse outside the command layer"


def test_function_local_imports_of_cvae_modules_are_few():
    local = [(name, target) for name, (path, tree) in modules().items()
             for target, inside in cvae_imports(tree, name, path.name == "__init__.py")
             if inside]
    assert len(local) <= MAX_LOCAL_IMPORTS, local


def test_the_checks_see_imports(tmp_path):
    """The AST walk finds module-level, function-local and relative imports (so the tests
    above can fail)."""
    tree = ast.parse("import cvae.data\nfrom cvae import model\n"
                     "def f():\n    from cvae.sheets import x\n"
                     "def g():\n    from .options import y\n")
    got = cvae_imports(tree, "cvae.cli.train")
    assert ("cvae.data", False) in got and ("cvae.model", False) in got
    assert ("cvae.sheets", True) in got and ("cvae.cli.options", True) in got



def test_every_package_is_installed():
    """pyproject.toml lists every package under cvae/ (a non-editable install, the wheel
    and the binary, ships only those listed: cvae/cli/ missing broke the binary once)."""
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages == listed
