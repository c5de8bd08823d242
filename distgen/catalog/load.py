"""Compose `distgen/configs/` with command-line overrides into a checked `RunConfig`.

Hydra's compose API is used rather than `@hydra.main`, so that nothing (log folders,
working-directory changes) happens per rank, and every composition error surfaces as one
`ConfigError` that names the bad key or value before any worker does work.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from distgen.catalog import GROUPS, VALUES, check as check_config
from distgen.config import RunConfig
from distgen.common.errors import ConfigError
from distgen.common.yaml_text import job_file_yaml
from distgen.inputs.source import FILE_FORMATS

PACKAGE = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE / "configs"
DATA_DIR = PACKAGE / "data"
PRIMARY_CONFIG = "run"
SCHEMA_NAME = "distgen_schema"
# `group=<path>` is shorthand for `group.<field>=<path>` when the value names a file or folder.
PATH_SHORTHANDS = {"dataset": "path", "model": "path"}


def register_schema() -> None:
    """The schema, plus one Hydra option per registered layout and launcher (their settings classes)."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=RunConfig)
    for table in GROUPS:
        table.store(store)
    if not OmegaConf.has_resolver("distgen_data"):
        OmegaConf.register_new_resolver("distgen_data", lambda name: str(DATA_DIR / name))


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def expand_path_shorthand(key: str, value: str, config_dir: Path) -> str | None:
    """`group=<path>` as `group.<field>=<path>`; None when `value` names one of the group's options.
    A value that is neither an option nor an existing path is an error naming both choices."""
    options = group_options(key, config_dir)
    if value in options:
        return None
    if os.path.exists(value) or os.sep in value or value.endswith(tuple(FILE_FORMATS)):
        return f"{key}.{PATH_SHORTHANDS[key]}={value}"
    what = "model folder (saved with save_pretrained)" if key == "model" else "prompts file"
    hub = f", nor a hub id (org/name; an id without org: {key}.path={value})" if key == "model" else ""
    raise ConfigError(f"{key}={value!r} is neither a {what} that exists (looked in {os.getcwd()}){hub}, nor one of "
                      f"the {key} configs: " + ", ".join(options))


def expand_path_shorthands(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    expanded = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in PATH_SHORTHANDS:
            override = expand_path_shorthand(key, value, config_dir) or override
        expanded.append(override)
    return expanded


def mapping_fields() -> tuple[str, ...]:
    """The dotted keys of the schema's mapping-typed fields outside the groups (generation.logit_bias)."""
    found = []
    for part in dataclasses.fields(RunConfig):
        kind = typing.get_type_hints(RunConfig).get(part.name)
        if not dataclasses.is_dataclass(kind) or part.name in {table.group for table in GROUPS}:
            continue
        hints = typing.get_type_hints(kind)
        found += [f"{part.name}.{f.name}" for f in dataclasses.fields(kind) if typing.get_origin(hints[f.name]) is dict]
    return tuple(found)


def whole_mappings(overrides: Sequence[str]) -> list[str]:
    """`generation.logit_bias={50256: -100}` sets the mapping whole: given as `++key=...`, since Hydra's struct
    mode refuses keys a plain override adds to a mapping (its default is empty); the last such override of a key
    wins alone (a command line's over a job file's), as a value's does."""
    mappings = mapping_fields()
    last = {o.partition("=")[0]: at for at, o in enumerate(overrides) if "=" in o and o.partition("=")[0] in mappings}
    return [f"++{o}" if at == last.get(o.partition("=")[0]) else o for at, o in enumerate(overrides)
            if o.partition("=")[0] not in last or at == last[o.partition("=")[0]]]


def extra_keys(node: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `node` the schema does not have: Hydra lets `+key=value` add them even to a typed config."""
    found = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in schema:
            found.append(full)
        elif (isinstance(node.get(key), DictConfig) and isinstance(schema.get(key), DictConfig)
              and OmegaConf.get_type(schema, key) is not dict):  # a dict-typed field takes any key
            found.extend(extra_keys(node[key], schema[key], full + "."))
    return found


def reject_extra_keys(composed: DictConfig, schema: DictConfig) -> None:
    """`schema`: the config with the same group choices (`layout=fsdp`) and no key overrides."""
    extra = extra_keys(composed, schema)
    if extra:
        raise ConfigError(f"unknown config key '{extra[0]}' (added with '+'); {unknown_key_hint(schema, extra[0])}")


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


# OmegaConf's words for a value of the wrong type -> what is allowed, in the words of the other checks.
EXPECTED = (("ListConfig", "expected a list, e.g. {key}=[{value}]"), ("Dict", "expected a mapping, e.g. {key}={{a: b}}"),
            ("Integer", "expected an integer"), ("valid bool", "expected true or false"), ("Float", "expected a number"))


def wrong_type(full_key: str, overrides: Sequence[str], root: BaseException) -> str:
    """`key='value' is not allowed: expected ...` for a value of the wrong type (Hydra said `Error merging override
    ...: Invalid value assigned: str is not a ListConfig, list or tuple.`)."""
    given = [o.lstrip("+").partition("=")[2] for o in overrides if o.lstrip("+").partition("=")[0] == full_key]
    reason = str(getattr(root, "msg", root)).splitlines()[0].strip()
    value = given[-1] if given else None
    if value is not None and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # quoted for Hydra (a job file's values are)
    expected = next((text for word, text in EXPECTED if word in reason), reason)
    shown = f"{full_key}={value!r}" if value is not None else full_key
    return f"{shown} is not allowed: " + expected.format(key=full_key, value=value)


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
    overrides = whole_mappings(expand_path_shorthands(overrides, config_dir))
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            composed = compose(config_name=PRIMARY_CONFIG, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            root = root_cause(err)
            full_key = getattr(root, "full_key", None)
            if isinstance(root, (ConfigKeyError, ConfigAttributeError)) and full_key:
                base = compose_selected_options(overrides)
                raise ConfigError(f"unknown config key '{full_key}'; {unknown_key_hint(base, full_key)}") from None
            if isinstance(root, ValidationError) and full_key:
                raise ConfigError(wrong_type(full_key, overrides, root)) from None
            raise ConfigError(describe(err, root)) from None
        if any(o.startswith("+") for o in overrides):
            reject_extra_keys(composed, compose_selected_options(overrides))
        return composed


# Hydra's flags naming a job file: --config-dir DIR --config-name NAME (NAME.yaml in DIR; -cd/-cn for short).
JOB_FILE_FLAGS = {"--config-dir": "dir", "-cd": "dir", "--config-name": "name", "-cn": "name"}


def split_job_file(args: Sequence[str]) -> tuple[list[str], Optional[Path]]:
    """The arguments without --config-dir/--config-name (as `--flag value` or `--flag=value`), and the job file
    they name: NAME(.yaml) in DIR (default: the working folder). A missing file is a ConfigError."""
    rest, given, values = [], {}, iter(args)
    for arg in values:
        flag, sep, value = arg.partition("=")
        if flag not in JOB_FILE_FLAGS:
            rest.append(arg)
            continue
        value = value if sep else next(values, "")
        if not value or value.startswith("-"):
            raise ConfigError(f"{flag} needs a value: --config-dir DIR --config-name NAME (NAME.yaml in DIR)")
        given[JOB_FILE_FLAGS[flag]] = value
    if not given:
        return rest, None
    if "name" not in given:
        raise ConfigError(f"--config-dir={given['dir']!r} needs --config-name NAME (the job file NAME.yaml in it)")
    name = given["name"] if given["name"].endswith((".yaml", ".yml")) else given["name"] + ".yaml"
    path = (Path(given.get("dir", ".")) / name).absolute()
    if not path.is_file():
        raise ConfigError(f"--config-name={given['name']!r} is not allowed: no job file {path}")
    return rest, path


def job_file_args(job_file: Optional[Path]) -> list[str]:
    """The flags that name `job_file` again (for the ranks a launcher starts)."""
    return [] if job_file is None else ["--config-dir", str(job_file.parent), "--config-name", job_file.name]


def hydra_value(value) -> str:
    """A value as Hydra's override grammar reads it back unchanged (strings quoted, lists and dicts spelled out)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        bad = [k for k in value if not re.fullmatch(r"[\w-]+", str(k))]
        if bad:
            raise ConfigError(f"key {bad[0]!r} of a mapping cannot be given as an override: use letters, digits, _ or -")
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value))  # backslashes before a quote or the end
    return "'" + text.replace("'", "\\'") + "'"


def leaf_overrides(tree: dict, schema: DictConfig, prefix: str = "") -> list[str]:
    """`key=value` for every value of a job file's tree; a dict the schema types as a structure is descended into,
    a dict-typed field (or a key the schema lacks, which composing then names) is one value."""
    found = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        node = schema.get(key) if isinstance(schema, DictConfig) and key in schema else None
        if isinstance(value, dict) and isinstance(node, DictConfig) and OmegaConf.get_type(schema, key) is not dict:
            found += leaf_overrides(value, node, full + ".")
        else:
            found.append(f"{full}={hydra_value(value)}")
    return found


def section_choices(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """The command line's choices of a whole section (`launcher=torchrun`, `generation=greedy`, `model=tiny`):
    group -> option; a path shorthand (`model=<folder>`) sets one key and is not among them."""
    groups = {table.group for table in GROUPS} | {p.name for p in config_dir.iterdir() if p.is_dir()}
    found = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in groups and (key not in PATH_SHORTHANDS or value in group_options(key, config_dir)):
            found[key] = value
    return found


def chosen_keys(group: str, config_dir: Path = CONFIG_DIR) -> set[str]:
    """The keys a choice among a YAML group's options decides: those its options do not all set alike
    (generation: do_sample, temperature, ...; not max_new_tokens, which greedy and sample both set to 32)."""
    options = [dict(flat_keys(OmegaConf.to_container(OmegaConf.load(config_dir / group / f"{name}.yaml")), f"{group}."))
               for name in group_options(group, config_dir)]
    keys = set().union(*options)
    return {key for key in keys if len(options) == 1 or any(key not in o or o[key] != options[0].get(key, o[key])
                                                            for o in options)}


def job_file_overrides(job_file: Path, config_dir: Path = CONFIG_DIR, replaced: Optional[dict] = None) -> list[str]:
    """A job file (a YAML tree of keys, as --print-config prints) as overrides: its layout/launcher choices first,
    then every value; the command line's overrides go after them, so they win. `replaced`: the command line's
    section choices (section_choices), which Hydra applies before every value: the file's values they set are
    left out (a YAML option's keys: `generation=greedy` is greedy whatever the file sampled with; another
    layout or launcher: the file's whole section, whose keys it does not have)."""
    try:
        tree = OmegaConf.to_container(OmegaConf.load(job_file), resolve=False)
    except Exception as err:  # yaml's and OmegaConf's errors: name the file
        raise ConfigError(f"job file {job_file} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"job file {job_file} holds no keys: expected a YAML mapping such as --print-config prints")
    tree.pop("defaults", None)
    dropped = set()
    for group, option in (replaced or {}).items():
        if (config_dir / group / f"{option}.yaml").is_file() and isinstance(tree.get(group), dict):
            dropped |= chosen_keys(group, config_dir)
        elif not (isinstance(tree.get(group), dict) and tree[group].get("name") == option):
            tree.pop(group, None)
    choices = [f"{table.group}={tree[table.group]['name']}" for table in GROUPS
               if isinstance(tree.get(table.group), dict) and "name" in tree[table.group]]
    # `model: <folder or option>` and `dataset: <file>` read as on the command line
    choices += [f"{key}={tree.pop(key)}" for key in PATH_SHORTHANDS if isinstance(tree.get(key), str)]
    register_schema()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        schema = compose_selected_options(choices)
    values = [o for o in leaf_overrides(tree, schema) if o.partition("=")[0] not in dropped]
    return [c for c in choices if c.partition("=")[0] not in (replaced or {})] + values


def load_config(overrides: Sequence[str], config_dir: Path = CONFIG_DIR, check: bool = True,
                job_file: Optional[Path] = None) -> RunConfig:
    """`check=False` composes without checking values (to show a config that is not finished yet); `job_file`: a
    YAML job file composed over the defaults, `overrides` on top."""
    if job_file is not None:
        sections = section_choices(overrides, config_dir)
        from_file = job_file_overrides(job_file, config_dir, sections)
        try:  # the file's own mistakes (a key it misspells, a value of the wrong type) name the file
            compose_config([*(f"{group}={option}" for group, option in sections.items()), *from_file], config_dir)
        except ConfigError as err:
            raise ConfigError(f"job file {job_file}: {err}") from None
        overrides = from_file + list(overrides)
    composed = compose_config(overrides, config_dir)
    try:
        cfg = OmegaConf.to_object(composed)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).strip()) from None
    return check_config(cfg) if check else cfg


def flat_keys(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for every leaf of a nested dict (an empty dict is a leaf)."""
    keys = []
    for key, value in tree.items():
        nested = isinstance(value, dict) and value  # an empty mapping (generation.logit_bias) is a value: {}
        keys.extend(flat_keys(value, f"{prefix}{key}.") if nested else [(f"{prefix}{key}", value)])
    return keys


def group_choices(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    """Each config group's options: YAML groups from `distgen/configs/`, registered ones from their tables."""
    groups = {p.name: group_options(p.name, config_dir) for p in config_dir.iterdir() if p.is_dir()}
    groups.update({table.group: list(table.names()) for table in GROUPS})
    return dict(sorted(groups.items()))


def option_keys(group: str, option: str, config_dir: Path) -> list[tuple[str, object]]:
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        composed = compose(config_name=PRIMARY_CONFIG, overrides=[f"{group}={option}"])
    return flat_keys(OmegaConf.to_container(composed[group], resolve=True), f"{group}.")


def format_keys(keys: list[tuple[str, object]]) -> list[str]:
    return [f"  {key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in keys]


def value_choices() -> list[str]:
    """Each name table of a plain config value (e.g. generation.scheduler), one line per name."""
    return [table.describe() for table in VALUES]


def help_text(config_dir: Path = CONFIG_DIR) -> str:
    """Groups with their options, every key with its default, and the keys each option brings."""
    groups = group_choices(config_dir)
    defaults = OmegaConf.to_container(compose_config([], config_dir), resolve=True)
    lines = ["Config groups (group=option; model= and dataset= also take a folder or file path):",
             *(f"  {group}=" + "|".join(options) for group, options in groups.items()),
             "", "Values chosen by name (key=value):", *value_choices(),
             "", "Keys (key=value), with their defaults:", *format_keys(flat_keys(defaults))]
    for group in (table.group for table in GROUPS):  # the groups whose options bring keys of their own
        for option in groups[group]:
            if option != defaults[group]["name"]:
                lines += ["", f"Keys with {group}={option}:", *format_keys(option_keys(group, option, config_dir))]
    return "\n".join(lines)


def config_to_yaml(cfg: RunConfig) -> str:
    """The config as a job file: read back (--config-dir/--config-name), it gives the same config."""
    return job_file_yaml(config_to_dict(cfg))


def config_to_dict(cfg: RunConfig) -> dict:
    """The config as --print-config prints it, as nested dicts (for stats.json). Plain dataclass fields, not an
    OmegaConf tree: a value's text (a stop string `${`) is text, never parsed as an interpolation."""
    return dataclasses.asdict(cfg)
