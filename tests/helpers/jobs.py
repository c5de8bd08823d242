"""Real jobs as processes (python -m, torchrun, deepspeed), their environment and pacing, and what the config of this
branch takes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from .prompts import DEFAULT_BUDGET

REPO = Path(__file__).resolve().parents[2]


def job_args(model_dir, prompts, out, *extra) -> list[str]:
    """A job over `prompts` into `out` (the multi-rank tests' job): DEFAULT_BUDGET new tokens, batches of 2."""
    return [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}",
            f"generation.max_new_tokens={DEFAULT_BUDGET}", "generation.batch_size=2", *extra]


def run_module(module: str, args, nproc: int | None = None, timeout: float = 240,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args`, under torchrun with `nproc` ranks when nproc is given (gloo, or NCCL on GPUs).

    The repository comes first on PYTHONPATH; what was there stays (packages carried to a GPU machine)."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *launcher, "-m", module, *map(str, args)], cwd=REPO,
                          env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def child_env() -> dict[str, str]:
    """The repository first on PYTHONPATH (what was there stays: packages carried to a GPU machine);
    DeepSpeed JIT-builds its C++ ops once into the ignored .cache/ that setup and CI keep."""
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), **os.environ,
            "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}


def paced_env(append_delay_s: float) -> dict[str, str]:
    """child_env, with every journal append in a rank sleeping `append_delay_s` (tests/slow_journal), so
    a test can signal, kill or preempt a job while it is surely part way through its prompts."""
    env = child_env()
    return {**env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{REPO / 'tests' / 'slow_journal'}",
            "DISTGEN_TEST_APPEND_DELAY_S": str(append_delay_s)}


def run_deepspeed(module: str, args, gpus: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module module args` (on CPU it starts N gloo ranks)."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    with socket.socket() as probe:  # deepspeed's fixed default port may be taken by another job
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.run([sys.executable, str(deepspeed), "--num_gpus", str(gpus), "--master_port", str(port),
                           "--module", module, *map(str, args)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def unknown_config_key(*overrides: str) -> str | None:
    """Why `overrides` do not compose because a key or option does not exist (a feature not on this
    branch yet), or None. Other config errors are left to the run that uses them."""
    from distgen.common.errors import ConfigError
    from distgen.catalog.load import load_config
    try:
        load_config(["model=tiny", "dataset=prompts.jsonl", *overrides])
    except ConfigError as err:
        if "unknown config key" in str(err) or "Could not find" in str(err):
            return str(err).splitlines()[0]
    return None


def layout_names() -> list[str]:
    """Every registered layout, read from the name table (so new layouts are tested as they land)."""
    from distgen.parallel.layouts import LAYOUTS
    return list(LAYOUTS.names())
