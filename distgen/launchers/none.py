"""No launcher: the job runs in this process as one rank, or is already running under one
(torchrun, srun, ...) that set the rank environment."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from distgen.config import LauncherConfig, RunConfig
from distgen.launchers.base import Entry, Launcher, register


@dataclass
class NoLauncher(LauncherConfig):
    """Run in this process (one rank), or under a launcher that already started it."""
    name: str = "none"


def launch(cfg: RunConfig, overrides: Sequence[str], entry: Entry) -> int:
    return entry(list(overrides))


register(Launcher("none", launch), NoLauncher)
