"""No launcher: the job runs in this process as one rank, or is already running under one
(torchrun, srun, ...) that set the rank environment."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from distgen.config import LauncherConfig, RunConfig
from distgen.launchers.base import Entry, Launcher, register
from distgen.parallel.env import RankInfo, discover


@dataclass
class NoLauncher(LauncherConfig):
    """Run in this process (one rank), or under a launcher that already started it."""
    name: str = "none"


def launch(cfg: RunConfig, overrides: Sequence[str], entry: Entry) -> int:
    return entry(list(overrides))


def launched_rank() -> Optional[RankInfo]:
    """This process's rank as whoever started it set it (none: rank 0 of 1); None where the rank variables do not
    read as numbers (the rank says so when it starts)."""
    try:
        return discover(os.environ)
    except RuntimeError:
        return None


def rank0_here(cfg: RunConfig) -> bool:
    """This process is the job's rank 0 (alone, or rank 0 of a launcher that started it: srun, torchrun)."""
    info = launched_rank()
    return info is not None and info.rank == 0


def one_of_several(cfg: RunConfig) -> bool:
    """This process is one rank of several that a launcher started (torchrun -m distgen.launch launcher=none)."""
    info = launched_rank()
    return info is not None and info.world_size > 1


register(Launcher("none", launch, holds_lock=rank0_here, checks_output=rank0_here, one_of_several=one_of_several),
         NoLauncher)
