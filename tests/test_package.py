"""The package as a newcomer gets it: its stages import only downwards (the import contract in pyproject.toml),
and a built wheel (not an editable install) runs a job from another folder with its configs and kernel source."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def test_stages_import_only_downwards():
    linter = VENV_BIN / "lint-imports"
    if not linter.exists():
        pytest.skip("import-linter is not installed (scripts/setup.sh installs it from requirements.txt)")
    result = subprocess.run([str(linter)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken" in result.stdout


def function_imports(source: str) -> list[str]:
    """The imports of distgen modules inside a function of `source`: the contract sees them, but not a cycle
    between two modules of one stage (kernels.py <-> model.py) that an import deferred into a function hides."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                found += [f"line {node.lineno}: {name}" for name in names if name.split(".")[0] == "distgen"]
    return found


def test_the_rule_sees_an_import_inside_a_function():
    assert function_imports("def f():\n    from distgen.models.lora import check_adapters\n") == \
        ["line 2: distgen.models.lora"]
    assert function_imports("class A:\n    def f(self):\n        import distgen.api\n") == ["line 3: distgen.api"]
    assert function_imports("from distgen.models import lora\ndef f():\n    import torch\n") == []


def test_distgen_modules_import_each_other_at_the_top():
    package = REPO / "distgen"
    lazy = {package / "__init__.py"}  # `import distgen` stays light: distgen.generate imports the api on first use
    found = {str(path.relative_to(REPO)): hits for path in sorted(package.rglob("*.py"))
             if path not in lazy and (hits := function_imports(path.read_text(encoding="utf-8")))}
    assert not found, f"import these at the top of the module (a cycle they hide: move the shared part down): {found}"


def test_config_schema_pulls_in_no_torch():
    code = "import sys, distgen.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """distgen built into a wheel and installed (no dependencies: those are the venv's) into a fresh folder."""
    out = tmp_path_factory.mktemp("wheel")
    # A copy of what a clone holds (tracked files, and new ones git does not ignore: a package folder that
    # .gitignore swallows would be missing here too), so the build also leaves nothing in the checkout.
    source = out / "source"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = list((out / "dist").glob("distgen-*.whl"))
    target = out / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return target


def test_wheel_holds_configs_and_kernel_source(installed_wheel):
    package = installed_wheel / "distgen"
    assert (package / "configs" / "run.yaml").is_file()
    assert (package / "configs" / "model" / "tiny.yaml").is_file()
    assert (package / "backends" / "cpu" / "cpu_kernels.c").is_file()
    assert (package / "data" / "demo_prompts.jsonl").is_file()


def test_installed_wheel_runs_a_job_from_another_folder(installed_wheel, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed_wheel), "DISTGEN_KERNEL_CACHE": str(tmp_path / "kernels")}
    where = subprocess.run([sys.executable, "-c", "import distgen; print(distgen.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(installed_wheel)), where.stdout + where.stderr
    run = subprocess.run([sys.executable, "-m", "distgen.launch", "model=tiny", "dataset=demo",
                          "generation.max_new_tokens=3", "output.dir=out"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (elsewhere / "out" / "outputs.jsonl").read_text().splitlines()]
    bundled = (REPO / "distgen" / "data" / "demo_prompts.jsonl").read_text().splitlines()
    assert [r["id"] for r in records] == [json.loads(line)["id"] for line in bundled]
    assert all(r["completion_tokens"] > 0 for r in records)
