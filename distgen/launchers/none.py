"""No launcher: the job runs in this process as one rank, or is already running under one
(torchrun, srun, ...) that set the rank environment."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from distgen.config import LauncherConfig, RunConfig
from distgen.launchers.base import Entry, Launcher, register
from distgen.parallel.env import discover


@dataclass
class NoLauncher(LauncherConfig):
    """Run in this process (one rank), or under a launcher that already started it."""
    name: str = "none"


def launch(cfg: RunConfig, overrides: Sequence[str], entry: Entry) -> int:
    return entry(list(overrides))


def rank0_here(cfg: RunConfig) -> bool:
    """This process is the job's rank 0 (alone, or rank 0 of a launcher that started it: srun, torchrun)."""
    try:
        return discover(os.environ).rank == 0
    except RuntimeError:  # rank variables that do not read as numbers: the rank says so when it starts
        return False


register(Launcher("none", launch, holds_lock=rank0_here, checks_output=rank0_here), NoLauncher)
