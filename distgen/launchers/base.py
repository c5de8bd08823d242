"""What a launcher is, and the table of launchers by name.

A launcher turns a checked config into a command or a submission and starts it; the text it
produces is a pure function of the config (tested against golden text).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from distgen.config import RunConfig
from distgen.registry import Registry

WORKER_MODULE = "distgen.run"


@dataclass(frozen=True)
class Launcher:
    name: str
    # Start the job for a checked config; `overrides` are the user's command-line overrides,
    # passed on unchanged to every worker. Returns the job's exit status.
    launch: Callable[[RunConfig, Sequence[str]], int]


LAUNCHERS: Registry[Launcher] = Registry("launcher")


def register(launcher: Launcher, config: type) -> Launcher:
    return LAUNCHERS.register(launcher.name, config, launcher)


def get_launcher(name: str) -> Launcher:
    return LAUNCHERS.get(name)
