"""torchrun: one agent per node starts `nproc_per_node` workers and sets their rank environment."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

from distgen.common.checks import require
from distgen.config import LauncherConfig, RunConfig
from distgen.launchers.base import WORKER_MODULE, Entry, Launcher, register, require_gpus, run_command


@dataclass
class TorchrunLauncher(LauncherConfig):
    """torchrun on this node: launcher.nproc_per_node workers (multi-node: nnodes + rdzv_endpoint)."""
    name: str = "torchrun"
    # Workers on this node: a number, or gpu (one per visible GPU, as torchrun reads it).
    nproc_per_node: Any = "gpu"
    nnodes: int = 1
    # host:port of the c10d rendezvous; empty picks a free local port (single node only).
    rdzv_endpoint: str = ""
    # torchrun restarts the whole worker group this many times after a rank fails; each restart
    # resumes from the journals, so finished completions are not generated again.
    max_restarts: int = 0

    def check(self) -> None:
        require(self.nproc_per_node == "gpu" or (type(self.nproc_per_node) is int and self.nproc_per_node >= 1),
                "launcher.nproc_per_node", self.nproc_per_node, "expected gpu (one worker per GPU) or an integer >= 1")
        require(self.nnodes >= 1, "launcher.nnodes", self.nnodes, "must be >= 1")
        require(self.max_restarts >= 0, "launcher.max_restarts", self.max_restarts, "must be >= 0")
        require(self.nnodes == 1 or bool(self.rdzv_endpoint), "launcher.rdzv_endpoint", self.rdzv_endpoint,
                "launcher.nnodes > 1 needs launcher.rdzv_endpoint=<host:port>")


def torchrun_command(cfg: TorchrunLauncher, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    """The torchrun argv for one node; a single node picks a free rendezvous port itself."""
    rendezvous = (["--standalone"] if cfg.nnodes == 1 and not cfg.rdzv_endpoint
                  else ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}"])
    restarts = [f"--max-restarts={cfg.max_restarts}"] if cfg.max_restarts else []
    return [python, "-m", "torch.distributed.run", f"--nnodes={cfg.nnodes}",
            f"--nproc-per-node={cfg.nproc_per_node}", *rendezvous, *restarts, "-m", WORKER_MODULE, *overrides]


def check_gpus_visible(cfg: RunConfig) -> None:
    """nproc_per_node=gpu (the default) counts this node's GPUs: there must be some, and the job must use them."""
    if cfg.launcher.nproc_per_node == "gpu":
        require_gpus(cfg, "launcher.nproc_per_node")


def launch(cfg: RunConfig, overrides: Sequence[str], entry: Entry) -> int:
    return run_command(torchrun_command(cfg.launcher, overrides))


def one_node(cfg: RunConfig) -> bool:
    """One node: rank 0 is one of this agent's workers (with several, the rendezvous decides which node has it)."""
    return cfg.launcher.nnodes == 1


register(Launcher("torchrun", launch, holds_lock=one_node), TorchrunLauncher, check=check_gpus_visible)
