"""The prepared GPU check, on a machine without a GPU: the wheels it carries fit the device tool's
carry limit, and scripts/gpu_check.sh runs every step, skips the GPU tests saying why, and writes its report."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.helpers import REPO

CARRY_LIMIT = 64 * 2**20
# What the device tool sends back from $OUT: at most 8 files, named in letters, digits, '.', '_', '-'.
OUT_FILES_MAX = 8
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
NO_NETWORK = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                        r"No route to host|Connection refused|ConnectTimeout")
# Distributions distgen needs on the GPU machine that its image lacks (or has in another version).
CARRIED = ("hydra_core", "omegaconf", "antlr4_python3_runtime", "deepspeed", "transformers", "pydantic", "datasets",
           "dill", "multiprocess", "optimum_quanto", "xgrammar", "apache_tvm_ffi")


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
    for line in ("- **facts**: ok", "- **install**: no wheels in", "- **imports**: ok", "- **attention**: ok",
                 "- **microbench**: ok", "- **tests (pytest -m gpu tests/test_gpu.py", "- **bench (bench/gpu.py)**: ok",
                 "Every step passed"):
        assert line in report, line
    assert "| CUDA visible | False |" in report
    assert "needs a CUDA GPU and none is visible" in report
    assert re.search(r"=+ \d+ skipped(, \d+ deselected)? in", report) and not re.search(r"\d+ (passed|failed|error)", report)
    assert "| distgen, defaults |" in report and "| defaults | 4 |" in report  # the job, and the microbench
    assert "| aten::_flash_attention_forward |" in report

    [written] = out.glob("gpu-cpu-*.json")  # bench/results/ takes it as it is
    result = json.loads(written.read_text())
    bench = {r["name"]: r for r in result["results"]}
    for name in ("distgen, defaults", "HF generate, static batches"):
        assert bench[name]["status"] == "ok" and bench[name]["generated_tokens"] > 0, bench[name]
        assert 0 < bench[name]["sol_fraction"] < 1 and bench[name]["sol_seconds"] > 0, bench[name]
    assert result["limits"]["copy_bytes_per_s"] > 0 and result["limits"]["gemm_flops_per_s"] > 0
    assert [m["status"] for m in result["microbench"]] == ["ok", "ok"]  # read from the microbench step's JSON
    # fp32 on CPU: distgen's completions equal HF generate's token for token
    prompts = result["args"]["prompts"]
    assert bench["distgen, defaults"]["equal_to_hf"] == f"{prompts}/{prompts}"

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= OUT_FILES_MAX and all(p.is_file() for p in out.iterdir()), files
    assert all(OUT_NAME.match(name) for name in files), files


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def test_the_jobs_speed_of_light_is_the_issues_figure():
    """bench/gpu.py's cost model on the 1B job with an H200's measured limits (4.3 TB/s copy, 790 TFLOP/s bf16):
    weights 1.94 GB per decode step, 22.5 KB of keys/values per token, so ~70-105k generated tok/s (issue 20);
    more rows, fewer weight passes."""
    from transformers import LlamaForCausalLM
    bench = load_bench()
    args = bench.parse_args(["--preset", "1b"])
    tokenizer = bench.build_tokenizer()
    with torch.device("meta"):
        model = LlamaForCausalLM(bench.tiny_llama_config(bench.model_config(args), tokenizer)).to(torch.bfloat16)
    cost = bench.model_cost(model)
    assert 1.9e9 < cost.weight_bytes < 2.0e9 and cost.kv_bytes_per_token == 2 * 22 * 4 * 64 * 2  # 22.5 KiB
    prompts = bench.job_prompts(args)  # bench/common.py's generator, the lengths and budgets spread evenly
    lengths = [len(tokenizer(p.text)["input_ids"]) for p in prompts]
    budgets = [p.budget for p in prompts]
    assert (len(prompts), min(lengths), max(lengths), min(budgets), max(budgets)) == (512, 16, 511, 32, 256)
    assert sum(budgets) == 73407  # the job measured since 2026-11-30 asked for the same tokens
    h200 = bench.Limits(4.3e12, 790e12)
    job = bench.job_cost(cost, lengths, budgets, rows=128, prefill_tokens=8192)
    tokens_per_second = sum(budgets) / bench.sol_seconds(job, h200)
    assert 70_000 < tokens_per_second < 105_000, tokens_per_second
    wider = bench.job_cost(cost, lengths, budgets, rows=512, prefill_tokens=8192)
    assert wider.decode_bytes < job.decode_bytes and wider.flops == job.flops
    # a hand-sized job: 2 prompts of 3 tokens, budgets 2 and 3, 2 rows: ceil(3 / 2) = 2 decode steps
    tiny = bench.ModelCost(weight_bytes=100, matmul_params=10, kv_bytes_per_token=1, attention_flops_per_key=2)
    small = bench.job_cost(tiny, [3, 3], [2, 3], rows=2, prefill_tokens=8)
    assert small.decode_bytes == 2 * 100 + (4 + 4 + 5) + 3 and small.decode_flops == 2 * 10 * 3 + 2 * 13
    assert small.prefill_bytes == 100 + 6 and small.prefill_flops == 2 * 10 * 6 + 2 * 12
