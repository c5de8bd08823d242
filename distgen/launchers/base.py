"""What a launcher is, and the table of launchers by name.

A launcher turns a checked config into a command or a submission and starts it; the text it
produces is a pure function of the config (tested against golden text).
"""
from __future__ import annotations

import logging
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from distgen.common.checks import require
from distgen.common.device import target_device
from distgen.config import RunConfig
from distgen.common.procs import run_process_group
from distgen.common.registry import Registry

logger = logging.getLogger(__name__)

WORKER_MODULE = "distgen.run"
# A rank's main: the command-line overrides -> its exit status.
Entry = Callable[[list[str]], int]


@dataclass(frozen=True)
class Launcher:
    name: str
    # Start the job for a checked config; `overrides` are the user's command-line overrides,
    # passed on unchanged to every worker; `entry` is what a rank runs in-process (`distgen.run.main`, for the
    # launchers that start ranks as Python calls: none, ray). Returns the job's exit status.
    launch: Callable[[RunConfig, Sequence[str], "Entry"], int]
    # Whether this config's rank 0 runs under the launching process, on this node, while it waits: then
    # distgen.launch holds output.dir's lock for the job from before its first process to its end
    # (distgen/outputs/lock.py). Not where rank 0 may run on another node or after the launcher returned.
    holds_lock: Callable[[RunConfig], bool] = lambda cfg: False
    # Whether distgen.launch checks output.dir (its lock, what an earlier job left) before it launches: every
    # launcher but launcher=none as a rank other than 0 of a launcher that started it (`torchrun -m distgen.launch
    # launcher=none`): its rank 0 checks and holds the lock, which this rank would take for another job's.
    checks_output: Callable[[RunConfig], bool] = lambda cfg: True
    # Whether this process is one rank of a job of several that another launcher started (launcher=none under
    # torchrun): a finished job is then said by its rank 0 inside the process group, so every rank goes on to join
    # it (a rank 0 returning early would leave the others waiting for it).
    one_of_several: Callable[[RunConfig], bool] = lambda cfg: False


LAUNCHERS: Registry[Launcher] = Registry("launcher")


def register(launcher: Launcher, config: type, check: Optional[Callable[[RunConfig], None]] = None) -> Launcher:
    """`check`: the launcher's rule about the rest of the config (run by the catalog before anything starts)."""
    return LAUNCHERS.register(launcher.name, config, launcher, check=check)


def get_launcher(name: str) -> Launcher:
    return LAUNCHERS.get(name)


def run_command(command: Sequence[str]) -> int:
    """Start a launcher's command and wait for it: the one place a launcher starts a process."""
    logger.info("launching %s", shlex.join(command))
    # Its own process group, every process under it tracked, SIGTERM/SIGINT/SIGHUP passed on to all of
    # them, and a watchdog that stops them if this process is killed: no worker outlives the launcher.
    return run_process_group(list(command))


def free_port() -> int:
    """A port free on this machine a moment ago (the launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def write_next_to_outputs(out_dir: str, name: str, text: str) -> Path:
    """A launcher's generated file (hostfile, sbatch script), kept in the job's output folder."""
    path = Path(out_dir).absolute() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def require_gpus(cfg: RunConfig, key: str) -> None:
    """`key`=gpu (one worker per visible GPU) needs GPUs, and a job that runs on them."""
    require(target_device(cfg.device) == "cuda", key, "gpu",
            "one worker per GPU, but this job runs on CPU (no GPU visible, or device=cpu); give the number of "
            f"workers, e.g. {key}=2")
