"""Every third-party module the harness imports is declared in pyproject.toml, so a fresh
virtual environment that installs the project can run everything it ships (a module that
only arrives through another package's dependencies can leave with that package's next
release: scipy did, and the sweep's report failed in a fresh install)."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPORTING_CALLS = {"import_module", "find_spec", "__import__"}  # importlib's, with a literal module name
# Modules the harness imports only for an optional feature, each from an extra of pyproject.toml
# (none yet): every other third-party import must be a required dependency.
OPTIONAL_MODULES: set[str] = set()


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level module -> the files under `folder` that import it: every `import` and
    `from ... import` statement (at any depth: imports inside functions count), importlib calls
    with a literal name, and the job server's preload list (module names as strings)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and getattr(node.func, "attr", getattr(node.func, "id", None)) in IMPORTING_CALLS):
                names = [node.args[0].value]
            elif (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRELOAD" for t in node.targets)
                  and isinstance(node.value, ast.List)):
                names = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(folder.parent)))
    return found


def declared_distributions(pyproject: Path, extras: bool = True) -> set[str]:
    """The project's dependencies (and, with `extras`, every optional extra's), by name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project["dependencies"])
    if extras:
        specs += [s for group in project.get("optional-dependencies", {}).values() for s in group]
    return {canonical(re.match(r"[A-Za-z0-9._-]+", s).group()) for s in specs}


def undeclared_imports(folder: Path, declared: set[str], first_party: set[str]) -> list[str]:
    """One line per third-party module imported under `folder` that no declared distribution
    provides (or that is not installed here, so nothing can say which distribution would)."""
    providers = packages_distributions()
    problems = []
    for module, files in sorted(imported_modules(folder).items()):
        if module in sys.stdlib_module_names or module in first_party or module == "__future__":
            continue
        dists = {canonical(d) for d in providers.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}): not installed here")
        elif not dists & declared:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}): provided by "
                            f"{', '.join(sorted(dists))}, which pyproject.toml does not declare")
    return problems


def test_every_third_party_import_of_the_harness_is_a_declared_dependency():
    problems = undeclared_imports(REPO / "harness", declared_distributions(REPO / "pyproject.toml"), {"harness"})
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_the_harness_runs_on_its_required_dependencies_alone():
    """What the harness imports is in `dependencies`, not only in an extra: a user's
    `pip install harness` must run the sweep and render its report."""
    required = declared_distributions(REPO / "pyproject.toml", extras=False)
    problems = undeclared_imports(REPO / "harness", required, {"harness", *OPTIONAL_MODULES})
    assert not problems, "imports that only an extra (or nothing) provides:\n" + "\n".join(problems)


def test_the_check_finds_an_undeclared_import_at_any_depth(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("import os\nimport numpy as np\nfrom pkg import b\n")
    (package / "b.py").write_text("def f():\n    from packaging import version\n    import importlib\n"
                                  "    importlib.import_module('yaml')\n")
    (package / "c.py").write_text("PRELOAD = ['pkg.a', 'jinja2']\n")
    (package / "d.py").write_text("import no_such_module_anywhere\n")
    problems = undeclared_imports(package, {"numpy", "jinja2"}, {"pkg"})
    assert [p.split(" ")[0] for p in problems] == ["no_such_module_anywhere", "packaging", "yaml"]
    assert "provided by packaging, which pyproject.toml does not declare" in problems[1]
    assert "pkg/b.py" in problems[2]
    assert undeclared_imports(package, {"numpy", "jinja2", "packaging", "pyyaml"}, {"pkg"}) == [problems[0]]
