"""Check a run's config, then start its workers with the configured launcher:

    python -m distgen.launch launcher=torchrun launcher.nproc_per_node=2 layout=fsdp dataset=prompts.jsonl

With launcher=none the job runs in this process (one rank).
"""
from __future__ import annotations

import subprocess
import sys
from typing import Sequence

from distgen.config import LauncherConfig
from distgen.errors import ConfigError
from distgen.load_config import load_config
from distgen.run import check_inputs, main as run_main

WORKER_MODULE = "distgen.run"


def torchrun_command(cfg: LauncherConfig, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    """The torchrun argv for one node; a single node picks a free rendezvous port itself."""
    rendezvous = (["--standalone"] if cfg.nnodes == 1 and not cfg.rdzv_endpoint
                  else ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}"])
    return [python, "-m", "torch.distributed.run", f"--nnodes={cfg.nnodes}",
            f"--nproc-per-node={cfg.nproc_per_node}", *rendezvous, "-m", WORKER_MODULE, *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(overrides)
        check_inputs(cfg)
    except ConfigError as err:
        print(f"distgen: config error: {err}", file=sys.stderr)
        return 2
    if cfg.launcher.name == "none":
        return run_main(overrides)
    command = torchrun_command(cfg.launcher, overrides)
    print("distgen: launching " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
