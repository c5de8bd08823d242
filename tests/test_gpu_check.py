"""The prepared GPU check, on a machine without a GPU: the wheels it carries fit the device tool's
carry limit, and scripts/gpu_check.sh runs every step, skips the GPU tests saying why, and writes its report."""
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import REPO

CARRY_LIMIT = 64 * 2**20
# What the device tool sends back from $OUT: at most 8 files, named in letters, digits, '.', '_', '-'.
OUT_FILES_MAX = 8
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
NO_NETWORK = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                        r"No route to host|Connection refused|ConnectTimeout")
# Distributions distgen needs on the GPU machine that its image lacks (or has in another version).
CARRIED = ("hydra_core", "omegaconf", "antlr4_python3_runtime", "deepspeed", "transformers", "pydantic", "datasets",
           "dill", "multiprocess", "optimum_quanto")


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sum((REPO / name).stat().st_size for name in names.split("\0") if name and (REPO / name).is_file())


def test_gpu_wheels_fit_the_carry_limit():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", "scripts/gpu_wheels.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0 and NO_NETWORK.search(result.stderr):
        pytest.skip("no package index reachable to download the wheels: " + NO_NETWORK.search(result.stderr)[0])
    assert result.returncode == 0, result.stderr[-3000:]
    wheels = sorted((REPO / ".cache" / "gpu-wheels").glob("*.whl"))
    names = {w.name.split("-")[0] for w in wheels}
    assert set(CARRIED) <= names, names
    assert len(names) == len(wheels), "one version of each package, or pip refuses the set"
    for wheel in wheels:  # each installs on the machine's Python 3.12 on x86-64
        assert re.search(r"-(py3-none-any|py312-none-any|(cp312-cp312|cp3\d+-abi3|py3-none)-manylinux[\w.]*x86_64)\.whl$",
                         wheel.name), wheel.name
        assert zipfile.is_zipfile(wheel), wheel.name
    size = sum(w.stat().st_size for w in wheels)
    assert size + tracked_bytes() < CARRY_LIMIT, f"{size / 2**20:.1f} MiB of wheels"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu_check.sh runs for real, not as a smoke test")
def test_gpu_check_reports_every_step_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_WHEELS": str(tmp_path / "no-wheels"),
           "GPU_CHECK_BENCH_ARGS": "--preset smoke --device cpu --dtype fp32", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    report = (out / "report.md").read_text()
    assert result.returncode == 0, report + result.stderr[-2000:]
    for line in ("- **facts**: ok", "- **install**: no wheels in", "- **imports**: ok",
                 "- **tests (pytest -m gpu tests/test_gpu.py", "- **bench (bench/gpu.py)**: ok", "Every step passed"):
        assert line in report, line
    assert "| CUDA visible | False |" in report
    assert "needs a CUDA GPU and none is visible" in report
    assert re.search(r"=+ \d+ skipped(, \d+ deselected)? in", report) and not re.search(r"\d+ (passed|failed|error)", report)
    assert "| distgen, continuous, eager |" in report

    bench = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    for name in ("distgen, continuous, eager", "HF generate, static batches"):
        assert bench[name]["status"] == "ok" and bench[name]["generated_tokens"] > 0, bench[name]
    # fp32 on CPU: distgen's completions equal HF generate's token for token
    prompts = json.loads((out / "bench.json").read_text())["args"]["prompts"]
    assert bench["distgen, continuous, eager"]["equal_to_hf"] == f"{prompts}/{prompts}"

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= OUT_FILES_MAX and all(p.is_file() for p in out.iterdir()), files
    assert all(OUT_NAME.match(name) for name in files), files
