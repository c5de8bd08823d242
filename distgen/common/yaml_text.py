"""A config tree as the YAML of a job file: what `--print-config` prints and the report shows."""
from __future__ import annotations

import re

from omegaconf import OmegaConf


def literal_text(value):
    """`value` with every string written so that OmegaConf reads it back as itself: a `${` that is text (a stop
    string, a chat template) escaped as `\\${`, the backslashes before it doubled (OmegaConf's escaping)."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, list):
        return [literal_text(v) for v in value]
    if isinstance(value, dict):
        return {k: literal_text(v) for k, v in value.items()}
    return value


def job_file_yaml(tree: dict) -> str:
    """`tree` (a config as nested dicts) as YAML that composes back into the same values (--config-name)."""
    return OmegaConf.to_yaml(literal_text(tree))
