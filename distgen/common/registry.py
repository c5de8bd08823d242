"""One name table per choice (layout, launcher, cache, dtype, ...).

Each implementation registers itself in its table, with its own settings dataclass where it has
settings, and with the cross-component rule it states (`check`). The catalog (distgen/catalog) checks a
config's names against the tables and runs the selected entries' checks; the Hydra group (a settings class
is stored in Hydra's ConfigStore under its name) and `--help` read the same tables, so a name is written
down once.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from distgen.common.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    # The implementation's settings: a dataclass deriving from the group's base config; None for a
    # choice that is a plain value (`generation.scheduler=chunked`), whose implementation documents it.
    config: Optional[type]
    impl: T
    # One line for --help (else the first line of the settings' or the implementation's docstring).
    doc: str = ""
    # A rule the implementation states about the rest of the run config (e.g. a quantizer's devices),
    # run by the catalog when this entry is selected: (the run config) -> None, raising ConfigError.
    check: Optional[Callable[[Any], None]] = None
    # The keys of its own this choice reads, where other choices of the key do not read them (compile=on reads
    # generation.compile_mode, compile=off does not): whole dotted keys. Such a key away from its default while a
    # choice that does not read it is selected is a config error (it would be ignored).
    owns: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        return self.doc or (inspect.getdoc(self.config if self.config is not None else self.impl) or "").split("\n")[0]


class Registry(Generic[T]):
    """Implementations of one config choice (e.g. `layout`), in registration order."""

    def __init__(self, group: str, valued: bool = False, also: Optional[dict[str, str]] = None,
                 within: Optional[str] = None):
        """valued: the choice is a plain config value (`generation.scheduler`), not a Hydra group.
        also: names the key accepts besides the registered ones, each with what it resolves to when the
        choice is built ({"auto": "a slot cache where ..."}): generation.cache=auto picks a registered cache.
        within: the option of a group whose settings hold this key (`launcher.mode` is a key of launcher=slurm):
        the key is checked only when that option is selected, and --help says which option it belongs to."""
        self.group, self.valued, self.also, self.within = group, valued, dict(also or {}), within
        self.entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config: Optional[type], impl: T, doc: str = "",
                 check: Optional[Callable[[Any], None]] = None, owns: tuple[str, ...] = ()) -> T:
        if name in self.entries or name in self.also:
            raise ValueError(f"{self.group} {name!r} is registered twice")
        self.entries[name] = Entry(name, config, impl, doc, check, tuple(owns))
        return impl

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def allowed(self) -> tuple[str, ...]:
        """Every name the key accepts: `also` first, then the registered ones."""
        return (*self.also, *self.entries)

    def get(self, name: str) -> T:
        return self.entry(name).impl

    def entry(self, name: str) -> Entry[T]:
        if name not in self.entries:
            raise self.refusal(name)
        return self.entries[name]

    def refusal(self, name: Any) -> ConfigError:
        return ConfigError(f"{self.key}={name!r} is not allowed: expected one of {', '.join(self.allowed())}")

    @property
    def key(self) -> str:
        """The config key that names a choice: `layout.name` for a group, the key itself for a plain value."""
        return self.group if self.valued else f"{self.group}.name"

    def selected(self, cfg: Any) -> Any:
        """The name this table's key holds in a run config."""
        return operator.attrgetter(self.key)(cfg)

    @property
    def section(self) -> str:
        """The part of a run config the key is in (`launcher` for `launcher.mode`)."""
        return self.key.partition(".")[0]

    def applies(self, cfg: Any) -> bool:
        """The run config has this key: always, unless it belongs to one option of a group (`within`)."""
        return self.within is None or operator.attrgetter(f"{self.section}.name")(cfg) == self.within

    def check_name(self, cfg: Any) -> None:
        """The run config names one of this table's choices (and, for a group, holds that choice's settings)."""
        if not self.applies(cfg):
            return
        name = self.selected(cfg)
        if name in self.also:
            return
        if self.valued:
            self.entry(name)
        else:
            self.check_selected(operator.attrgetter(self.group)(cfg))

    def check_rules(self, cfg: Any) -> None:
        """The selected choice's own rule about the rest of the config, if it states one; and no setting that only
        other choices read is set (it would be ignored)."""
        entry = self.entries.get(self.selected(cfg)) if self.applies(cfg) else None
        if entry is None:
            return
        self.check_owned(cfg, entry)
        if entry.check is not None:
            entry.check(cfg)

    def owners(self, key: str) -> list[str]:
        """The choices that read `key` (one of the keys some choices own)."""
        return [e.name for e in self.entries.values() if key in e.owns]

    def check_owned(self, cfg: Any, entry: Entry[T]) -> None:
        """Every key that only other choices read is at its default (a name in `also`, such as auto, picks a
        choice later: it may read any of them, and is never selected here)."""
        for key in sorted({key for e in self.entries.values() for key in e.owns} - set(entry.owns)):
            value = operator.attrgetter(key)(cfg)
            if value != default_of(cfg, key):
                raise ConfigError(f"{key}={value!r} is not allowed with {self.key}={entry.name}, which does not read "
                                  f"it: it is a setting of {self.key}={' or '.join(self.owners(key))} (leave it out, "
                                  "or choose one of those)")

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
        """One line per name the key takes (a key of one option says which: `(launcher=slurm)`)."""
        where = f"({self.section}={self.within}) " if self.within is not None else ""
        lines = [f"  {self.group}={name:<12} {where}{doc}" for name, doc in self.also.items()]
        return "\n".join(lines + [f"  {self.group}={e.name:<12} {where}{e.summary}{reads(e.owns)}"
                                  for e in self.entries.values()])


def reads(keys: tuple[str, ...]) -> str:
    """--help's note of the settings a choice owns."""
    return f" (reads {', '.join(key.rpartition('.')[2] for key in keys)})" if keys else ""


def default_of(cfg: Any, key: str) -> Any:
    """A dotted key's default in its part's dataclass (`generation.compile_mode` -> "default")."""
    path, _, name = key.rpartition(".")
    spec = next(f for f in dataclasses.fields(operator.attrgetter(path)(cfg)) if f.name == name)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
