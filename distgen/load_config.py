"""Compose `configs/` with command-line overrides into a checked `RunConfig`.

Hydra's compose API is used rather than `@hydra.main`, so that nothing (log folders,
working-directory changes) happens per rank, and every composition error surfaces as one
`ConfigError` that names the bad key or value before any worker does work.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from distgen.config import RunConfig
from distgen.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DATA_DIR = Path(__file__).resolve().parent / "data"
PRIMARY_CONFIG = "run"
SCHEMA_NAME = "distgen_schema"
# `group=<path>` is shorthand for `group.<field>=<path>` when the value names a file or folder.
PATH_SHORTHANDS = {"dataset": "path", "model": "path"}
FILE_SUFFIXES = (".jsonl", ".json", ".txt")


def register_schema() -> None:
    """The schema, plus one Hydra option per registered layout and launcher (their settings classes)."""
    from distgen.launchers import LAUNCHERS
    from distgen.layouts import LAYOUTS

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=RunConfig)
    for table in (LAYOUTS, LAUNCHERS):
        table.store(store)
    if not OmegaConf.has_resolver("distgen_data"):
        OmegaConf.register_new_resolver("distgen_data", lambda name: str(DATA_DIR / name))


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def expand_path_shorthands(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    expanded = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in PATH_SHORTHANDS and value not in group_options(key, config_dir) and (
            os.path.exists(value) or os.sep in value or value.endswith(FILE_SUFFIXES)
        ):
            override = f"{key}.{PATH_SHORTHANDS[key]}={value}"
        expanded.append(override)
    return expanded


def unknown_key_hint(base: DictConfig, full_key: str) -> str:
    """Name the keys that do exist where `full_key` was looked for."""
    parts = full_key.split(".")
    node = base
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, DictConfig) else None
        if not isinstance(child, DictConfig):
            parts = parts[: depth + 1]
            break
        node = child
    where = ".".join(parts[:-1]) or "the top level"
    return f"keys allowed under {where}: " + ", ".join(str(k) for k in node.keys())


def root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def describe(err: BaseException, root: BaseException) -> str:
    """The first lines of Hydra's message plus the innermost reason, without search-path noise."""
    outer = str(err).split("Config search path:")[0].strip()
    inner = str(root).split("\n")[0].strip()
    return outer if root is err or inner in outer else f"{outer}: {inner}"


def compose_selected_options(overrides: Sequence[str]) -> DictConfig:
    """The config with only the user's group choices (`layout=fsdp`) applied, so an unknown-key
    hint names the keys of the option the user picked; the defaults if those do not compose."""
    choices = [o for o in overrides if "=" in o and "." not in o.split("=")[0] and not o.startswith(("+", "~"))]
    try:
        return compose(config_name=PRIMARY_CONFIG, overrides=choices)
    except (HydraException, OmegaConfBaseException):
        return compose(config_name=PRIMARY_CONFIG)


def compose_config(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    register_schema()
    overrides = expand_path_shorthands(overrides, config_dir)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            return compose(config_name=PRIMARY_CONFIG, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            root = root_cause(err)
            full_key = getattr(root, "full_key", None)
            if isinstance(root, (ConfigKeyError, ConfigAttributeError)) and full_key:
                base = compose_selected_options(overrides)
                raise ConfigError(f"unknown config key '{full_key}'; {unknown_key_hint(base, full_key)}") from None
            raise ConfigError(describe(err, root)) from None


def load_config(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> RunConfig:
    composed = compose_config(overrides, config_dir)
    try:
        cfg = OmegaConf.to_object(composed)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).strip()) from None
    return cfg.check()


def config_to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
