"""deepspeed's launcher: `deepspeed --num_gpus N --module distgen.run ...` on this node, or over
ssh/pdsh on the hosts of a hostfile (`--num_nodes`). Each rank gets torch's rank variables plus a
`--local_rank=N` argument, which distgen.run accepts."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from distgen.common.checks import require
from distgen.config import LauncherConfig, RunConfig
from distgen.common.errors import ConfigError
from distgen.launchers.base import (WORKER_MODULE, Entry, Launcher, free_port, register, require_gpus, run_command,
                                    write_next_to_outputs)

HOSTFILE_NAME = "deepspeed.hostfile"


@dataclass
class DeepspeedLauncher(LauncherConfig):
    """deepspeed: launcher.num_gpus ranks per node (multi-node: launcher.hosts or hostfile, num_nodes)."""
    name: str = "deepspeed"
    # Ranks per node: gpu (one per GPU visible on the launching node, as deepspeed itself counts them), or a
    # number (on a CPU machine, processes).
    num_gpus: Any = "gpu"
    num_nodes: int = 1
    # Multi-node: the hosts (reachable by ssh), written as a hostfile next to the outputs, ...
    hosts: list[str] = field(default_factory=list)
    # ... or an existing hostfile ("host slots=N" lines).
    hostfile: str = ""
    # Where rank 0 listens; empty: deepspeed's choice (the first host). Port 0: a free one here.
    master_addr: str = ""
    master_port: int = 0

    def check(self) -> None:
        require(self.num_gpus == "gpu" or (type(self.num_gpus) is int and self.num_gpus >= 1), "launcher.num_gpus",
                self.num_gpus, "expected gpu (one rank per GPU) or an integer >= 1")
        require(self.num_nodes >= 1, "launcher.num_nodes", self.num_nodes, "must be >= 1")
        require(not (self.hosts and self.hostfile), "launcher.hostfile", self.hostfile,
                "give launcher.hosts or launcher.hostfile, not both")
        require(self.num_nodes == 1 or len(self.hosts) >= self.num_nodes or bool(self.hostfile), "launcher.num_nodes",
                self.num_nodes, f"needs launcher.hosts=[...] with at least {self.num_nodes} hosts, "
                                "or launcher.hostfile=<file>")
        require(0 <= self.master_port <= 65535, "launcher.master_port", self.master_port, "must be a port, 0-65535")


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """deepspeed's hostfile: one `host slots=N` line per node."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def ranks_per_node(cfg: DeepspeedLauncher) -> int:
    """launcher.num_gpus, gpu resolved to the GPUs this node sees (as deepspeed itself counts them)."""
    if cfg.num_gpus != "gpu":
        return cfg.num_gpus
    import torch
    return torch.cuda.device_count()


def deepspeed_command(cfg: DeepspeedLauncher, overrides: Sequence[str], hostfile: Optional[str], master_port: int,
                      python: str = sys.executable) -> list[str]:
    """The `deepspeed` argv (run as `python -m deepspeed.launcher.runner`, the same program)."""
    nodes = [f"--hostfile={hostfile}", f"--num_nodes={cfg.num_nodes}"] if hostfile else []
    master = [f"--master_addr={cfg.master_addr}"] if cfg.master_addr else []
    return [python, "-m", "deepspeed.launcher.runner", *nodes, f"--num_gpus={ranks_per_node(cfg)}", *master,
            f"--master_port={master_port}", "--module", WORKER_MODULE, *overrides]


def launch(cfg: RunConfig, overrides: Sequence[str], entry: Entry) -> int:
    settings: DeepspeedLauncher = cfg.launcher
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("launcher=deepspeed is not allowed here: the deepspeed package is not installed "
                          "(pip install deepspeed)")
    hostfile = settings.hostfile or None
    if settings.hosts:
        hostfile = str(write_next_to_outputs(cfg.output.dir, HOSTFILE_NAME,
                                             hostfile_text(settings.hosts, ranks_per_node(settings))))
    port = settings.master_port or free_port()
    return run_command(deepspeed_command(settings, overrides, hostfile, port))


def check_gpus_visible(cfg: RunConfig) -> None:
    if cfg.launcher.num_gpus == "gpu":
        require_gpus(cfg, "launcher.num_gpus")


def this_node_only(cfg: RunConfig) -> bool:
    """No hosts and no hostfile: every rank runs on this node, under deepspeed's local launcher."""
    settings: DeepspeedLauncher = cfg.launcher
    return settings.num_nodes == 1 and not settings.hosts and not settings.hostfile


register(Launcher("deepspeed", launch, holds_lock=this_node_only), DeepspeedLauncher, check=check_gpus_visible)
