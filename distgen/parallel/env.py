"""The process group and device of this rank, read from the launcher's environment.

Every launcher tells a rank who it is through environment variables; which ones is one table,
RANK_ENV, read in one place, `discover`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from distgen.common.device import target_device
from distgen.common.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    # Ranks on this host, sharing its RAM (RankInfo.local_world_size).
    local_world_size: int = 1

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class RankVars:
    """The environment variables one launcher sets for each rank it starts."""
    launcher: str
    # Set only under this launcher: the first row whose marker is present describes this rank.
    marker: str
    rank: str
    world_size: str
    local_rank: str
    master_addr: str
    master_port: str
    # torch's own env:// names: join with env:// (under torchrun that reuses its agent's store);
    # otherwise rank 0 hosts the store at tcp://master_addr:master_port.
    torch_env: bool = False
    # Where master_addr is not set: the first host of this nodelist variable (SLURM: the batch host).
    nodelist: str = ""
    # Where master_port is not set: a port derived from this job id variable, the same on every rank.
    job_id: str = ""
    # The ranks on this rank's host: a count, or SLURM's per-node counts (`2(x3),1`, one per node of the
    # step), of which `node_index` (the host's place in that list) picks this host's. Unset: 1.
    local_world_size: str = ""
    node_index: str = ""
    # Each rank is a child process of this launcher's local agent (torchrun, deepspeed's launch,
    # slurmstepd): a rank whose agent is gone stops (distgen.common.procs.exit_with_parent).
    agent_parent: bool = True


# Order matters: torchrun or deepspeed may run inside a SLURM allocation (srun + torchrun per
# node), so their rows come first and SLURM's last.
RANK_ENV: tuple[RankVars, ...] = (
    RankVars("torchrun", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             torch_env=True, local_world_size="LOCAL_WORLD_SIZE"),
    # deepspeed also passes `--local_rank=N` to the module (see `discover`); its launcher names the
    # ranks on a node LOCAL_SIZE (deepspeed/launcher/launch.py), not torch's LOCAL_WORLD_SIZE.
    RankVars("deepspeed", "CROSS_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             torch_env=True, local_world_size="LOCAL_SIZE"),
    # Set by distgen's Ray actors (distgen/launchers/ray.py) in their own process.
    RankVars("ray", "DISTGEN_RAY_RANK", "DISTGEN_RAY_RANK", "DISTGEN_RAY_WORLD_SIZE", "DISTGEN_RAY_LOCAL_RANK",
             "DISTGEN_RAY_MASTER_ADDR", "DISTGEN_RAY_MASTER_PORT", local_world_size="DISTGEN_RAY_LOCAL_WORLD_SIZE",
             agent_parent=False),  # an actor's process belongs to Ray, which ends it with its driver
    # One srun task per rank (the batch script itself has no step id). distgen's sbatch script
    # exports DISTGEN_MASTER_ADDR/PORT; a hand-written `srun python -m distgen.run` falls back to
    # the nodelist and the job id. srun sets the step's tasks per node (`2(x2),1`) in nodelist
    # order and SLURM_NODEID, this node's index in the step (SLURM_NTASKS_PER_NODE is set only
    # when --ntasks-per-node was given).
    RankVars("slurm", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "DISTGEN_MASTER_ADDR",
             "DISTGEN_MASTER_PORT", nodelist="SLURM_STEP_NODELIST", job_id="SLURM_JOB_ID",
             local_world_size="SLURM_STEP_TASKS_PER_NODE", node_index="SLURM_NODEID"),
    # Any other launcher that sets torch's own variables (its parent may be a script that leaves it running).
    RankVars("env", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", torch_env=True,
             local_world_size="LOCAL_WORLD_SIZE", agent_parent=False),
)
RANK_VARS = {row.launcher: row for row in RANK_ENV}


@dataclass(frozen=True)
class RankInfo:
    """Who this rank is, as its launcher said; launcher "none" when it runs alone."""
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str = ""
    master_port: int = 0
    torch_env: bool = False
    # Ranks on this rank's host (they share its RAM); 1 when the launcher does not say or it runs alone.
    local_world_size: int = 1
    # This process's parent is the launcher's agent (RankVars.agent_parent).
    agent_parent: bool = False

    @property
    def init_method(self) -> str:
        return "env://" if self.torch_env else f"tcp://{self.master_addr}:{self.master_port}"


ALONE = RankInfo("none", 0, 1, 0)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: `gpu[03-04,7],cpu1` -> `gpu03`."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not first:
        raise ValueError(f"cannot read a host from the nodelist {nodelist!r}")
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first.group(0))


def port_for_job(job_id: str) -> int:
    """A port every rank of one job derives alike, spread over 20000-39999 by job id."""
    return 20000 + int(job_id) % 20000


def tasks_per_node(text: str) -> list[int]:
    """Ranks per node from a count (`4`) or SLURM's compressed list: `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot read ranks per node from {text!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def local_world_size(row: RankVars, environ: Mapping[str, str]) -> int:
    """The ranks on this rank's host, as `row`'s launcher says; 1 when it does not."""
    text = environ.get(row.local_world_size, "") if row.local_world_size else ""
    if not text.strip():
        return 1
    try:
        counts = tasks_per_node(text)
    except ValueError:
        raise RuntimeError(f"running under {row.launcher}, but {row.local_world_size}={text!r} is not a number of "
                           "ranks per node") from None
    node = environ.get(row.node_index, "0") if row.node_index else "0"
    if not node.isdigit():
        raise RuntimeError(f"running under {row.launcher}, but {row.node_index}={node!r} is not a number")
    return counts[int(node)] if int(node) < len(counts) else 1


def rank_info(row: RankVars, environ: Mapping[str, str], local_rank_arg: Optional[int] = None) -> RankInfo:
    def number(var: str) -> int:
        try:
            return int(environ[var])
        except (KeyError, ValueError):
            raise RuntimeError(f"running under {row.launcher} ({row.marker} is set), but {var}="
                               f"{environ.get(var)!r} is not a number") from None

    rank, world_size = number(row.rank), number(row.world_size)
    addr = environ.get(row.master_addr) or (first_host(environ[row.nodelist]) if row.nodelist in environ else "")
    port = environ.get(row.master_port) or (str(port_for_job(environ[row.job_id])) if row.job_id in environ else "")
    if not row.torch_env and (not addr or not port.isdigit()):
        raise RuntimeError(f"running under {row.launcher}, but the rendezvous address is unknown: set "
                           f"{row.master_addr} and {row.master_port}")
    local_rank = number(row.local_rank) if local_rank_arg is None else local_rank_arg
    return RankInfo(row.launcher, rank, world_size, local_rank, addr,
                    int(port) if port.isdigit() else 0, row.torch_env, local_world_size(row, environ), row.agent_parent)


def discover(environ: Mapping[str, str], local_rank_arg: Optional[int] = None) -> RankInfo:
    """This rank's place in the job, from the first RANK_ENV row whose marker is set. `local_rank_arg`
    is deepspeed's `--local_rank=N` argument, which wins over the environment."""
    for row in RANK_ENV:
        if row.marker in environ:
            return rank_info(row, environ, local_rank_arg)
    return ALONE


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: no CUDA device is visible; use device=cpu or auto")
    if target_device(requested) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


ELASTIC_ATTEMPT = "TORCHELASTIC_RESTART_COUNT"


def elastic_store(info: RankInfo, environ: Mapping[str, str], timeout: timedelta) -> dist.Store:
    """The rendezvous store of one torchrun attempt. torchrun's agent keeps one store for the whole
    job and env:// joins it without a per-attempt prefix, so after `--max-restarts` brings the
    workers back they would read the dead group's gloo addresses and fail to connect ("Connection
    refused"). A prefix per restart count keeps every attempt's keys apart."""
    agent_hosts_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(info.master_addr, info.master_port, info.world_size,
                          is_master=not agent_hosts_store and info.rank == 0, timeout=timeout,
                          multi_tenant=not agent_hosts_store)
    return dist.PrefixStore(f"distgen/attempt_{environ[ELASTIC_ATTEMPT]}", store)


def init_distributed(requested_device: str, timeout_s: float = 1800, info: Optional[RankInfo] = None) -> DistContext:
    """Join the launcher's process group, or make a one-rank group when run alone."""
    info = discover(os.environ) if info is None else info
    device = resolve_device(requested_device, info.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if info.launcher == "none":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif ELASTIC_ATTEMPT in os.environ:
            dist.init_process_group(backend, store=elastic_store(info, os.environ, timeout), rank=info.rank,
                                    world_size=info.world_size, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, init_method=info.init_method, rank=info.rank,
                                    world_size=info.world_size, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
    return DistContext(info.rank, info.world_size, info.local_rank, device, backend, info.local_world_size)


def shutdown(clean: bool) -> None:
    """After a clean finish, wait for every rank first: a rank that tears its connections down
    while a peer still reads the last collective's data can abort (seen with gloo)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
