"""The test suite's own rules (issue 22 item 7): no test module imports another test module or conftest.py;
tests/conftest.py holds fixtures and pytest hooks only; the helpers are one package, tests/helpers/, imported as
`tests.helpers`, which exports every helper its modules define."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def forbidden_imports(source: str, test_modules: set[str]) -> list[str]:
    """The imports in `source` (anywhere: top level, in functions, after code) of a test module, of conftest, or of
    the helpers by any name but `tests.helpers`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            targets = [base] + [f"{base}.{alias.name}" if node.module else base + alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            relative = target.startswith(".")
            parts = target.lstrip(".").removeprefix("tests.").split(".") if target != "tests" else [""]
            if parts[0] in test_modules or parts[0] == "conftest":
                found.append(f"line {node.lineno}: {target}")
            elif parts[0] == "helpers" and not relative and not target.startswith("tests."):
                found.append(f"line {node.lineno}: {target} (import tests.helpers)")
    return sorted(set(found))


def test_the_rule_sees_every_form_of_a_forbidden_import():
    modules = {"test_engine"}
    for source in ("from conftest import PROMPTS", "import conftest", "from tests.conftest import PROMPTS",
                   "from tests import conftest", "from . import conftest", "from .conftest import PROMPTS",
                   "import test_engine", "from test_engine import CPU", "from tests.test_engine import CPU",
                   "from tests import test_engine", "from . import test_engine", "def f():\n    import test_engine",
                   "x = 1\nfrom helpers import engine_for", "import helpers"):
        assert forbidden_imports(source, modules), source
    for source in ("from tests.helpers import PROMPTS", "from tests import helpers", "from .engine import CPU",
                   "from distgen.engine import Engine", "import test_tools", "from tests.helpers.jobs import REPO"):
        assert not forbidden_imports(source, modules), source


def test_no_test_module_imports_another_test_module_or_conftest():
    modules = {p.stem for p in TESTS.glob("test_*.py")}
    bad = {str(p.relative_to(TESTS)): found for p in python_files()
           if (found := forbidden_imports(p.read_text(encoding="utf-8"), modules))}
    assert not bad, f"move what they import into tests/helpers/ (or a fixture into conftest.py): {bad}"


def is_fixture(node: ast.AST) -> bool:
    def names(decorator):
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return ast.unparse(target)
    return any(names(d).endswith("fixture") for d in node.decorator_list)


def test_conftest_holds_only_fixtures_and_hooks():
    tree = ast.parse((TESTS / "conftest.py").read_text(encoding="utf-8"))
    others = []
    for index, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (index == 0 and isinstance(node, ast.Expr)):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (is_fixture(node)
                                                                         or node.name.startswith("pytest_")):
            continue
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["pytest_plugins"]:
            continue
        others.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}")
    assert not others, f"helpers belong in tests/helpers/: {others}"


def test_helpers_are_one_package_that_exports_every_helper():
    assert not (TESTS / "helpers.py").exists(), "tests/helpers.py: its contents belong in tests/helpers/"
    stray = [p.name for p in TESTS.glob("*.py") if p.name not in ("__init__.py", "conftest.py")
             and not p.name.startswith("test_")]
    assert not stray, f"modules in tests/ that are not test modules (helpers belong in tests/helpers/): {stray}"
    from tests import helpers
    for module in sorted((TESTS / "helpers").glob("*.py")):
        if module.name == "__init__.py":
            continue
        tree = ast.parse(module.read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)}
        missing = sorted(name for name in defined if not name.startswith("_") and name not in helpers.__all__)
        assert not missing, f"tests/helpers/__init__.py does not export {module.name}'s {missing}"
