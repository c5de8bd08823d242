"""One name table per choice (layout, launcher, ...).

Each implementation is one module that registers itself with its own settings dataclass; the
config check, the Hydra group (the settings class is stored in Hydra's ConfigStore under the
implementation's name) and the docs all read the table, so a name is written down once.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

from distgen.common.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    # The implementation's settings: a dataclass deriving from the group's base config; None for a
    # choice that is a plain value (`generation.scheduler=chunked`), whose implementation documents it.
    config: Optional[type]
    impl: T

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.config if self.config is not None else self.impl) or "").split("\n")[0]


class Registry(Generic[T]):
    """Implementations of one config group (e.g. `layout`), in registration order."""

    def __init__(self, group: str, valued: bool = False):
        """valued: the choice is a plain config value (`generation.scheduler`), not a Hydra group."""
        self.group, self.valued = group, valued
        self.entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config: Optional[type], impl: T) -> T:
        if name in self.entries:
            raise ValueError(f"{self.group} {name!r} is registered twice")
        self.entries[name] = Entry(name, config, impl)
        return impl

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def get(self, name: str) -> T:
        return self.entry(name).impl

    def entry(self, name: str) -> Entry[T]:
        if name not in self.entries:
            raise ConfigError(f"{self.key}={name!r} is not allowed: expected one of {', '.join(self.names())}")
        return self.entries[name]

    @property
    def key(self) -> str:
        """The config key that names a choice: `layout.name` for a group, the key itself for a plain value."""
        return self.group if self.valued else f"{self.group}.name"

    def check_selected(self, settings) -> None:
        """`settings` names a registered implementation and is that implementation's settings class."""
        entry = self.entry(settings.name)
        if type(settings) is not entry.config:
            raise ConfigError(f"{self.group}.name={settings.name!r} is not allowed: it does not match the selected "
                              f"{self.group} settings ({type(settings).__name__}); choose it with "
                              f"{self.group}={settings.name}")

    def store(self, config_store) -> None:
        """Make each implementation's settings a Hydra option of the group: `layout=fsdp`."""
        for entry in self.entries.values():
            if entry.config is not None:
                config_store.store(group=self.group, name=entry.name, node=entry.config)

    def describe(self) -> str:
        return "\n".join(f"  {self.group}={e.name:<12} {e.summary}" for e in self.entries.values())
