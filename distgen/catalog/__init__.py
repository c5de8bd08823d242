"""The catalog: every implementation imported so that it registers in its name table, and the checks that read
those tables. The schema (distgen/config.py) checks values; here a config's names are checked against the
tables (a layout, a cache, a dtype ...), then each selected implementation's own rule about the rest of the
config runs (`Entry.check`: a quantizer's devices, a cache's device, a layout's package). Everything below
this stage knows nothing of the others' names.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from distgen.backends.cpu.kernels import CPU_KERNELS
from distgen.common.device import DEVICES
from distgen.common.log import LOG_LEVELS
from distgen.common.registry import Registry
from distgen.config import RunConfig
from distgen.engine.assist import ASSISTANTS, DRAFT_SCHEDULES
from distgen.engine.build import COMPILE
from distgen.engine.grammar import check_grammar
from distgen.engine.kv import CACHES
from distgen.engine.kv.attention import ATTENTIONS
from distgen.engine.kv.quantized import QUANT_BACKENDS
from distgen.engine.prefix import PREFIX_SHARING
from distgen.engine.runner import AUTOCAST, COMPILE_MODES
from distgen.engine.scheduler import SCHEDULERS
from distgen.inputs.screening import TOO_LONG
from distgen.inputs.source import DATASET_FORMATS
from distgen.launchers import LAUNCHERS
from distgen.launchers.ray import PLACEMENT_STRATEGIES
from distgen.launchers.slurm import SLURM_MODES
from distgen.models.loading import ATTENTION, DTYPES, MODEL_SOURCES
from distgen.models.quantizers import QUANTIZERS
from distgen.outputs.shards import MERGE_FORMATS, OUTPUT_FORMATS
from distgen.parallel.layouts import LAYOUTS
from distgen.parallel.layouts.zero3 import OFFLOAD_DEVICES

# Every choice's name table, in the order a config's names are checked (and --help lists them).
TABLES: tuple[Registry, ...] = (
    DEVICES, LAYOUTS, OFFLOAD_DEVICES, LAUNCHERS, SLURM_MODES, PLACEMENT_STRATEGIES,
    MODEL_SOURCES, DTYPES, ATTENTION, QUANTIZERS, ASSISTANTS,
    SCHEDULERS, CACHES, QUANT_BACKENDS, COMPILE, COMPILE_MODES, AUTOCAST, CPU_KERNELS, ATTENTIONS, DRAFT_SCHEDULES,
    PREFIX_SHARING,
    DATASET_FORMATS, TOO_LONG, OUTPUT_FORMATS, MERGE_FORMATS, LOG_LEVELS,
)
# The Hydra groups (each option is an implementation's settings class); the rest are plain values.
GROUPS: tuple[Registry, ...] = tuple(table for table in TABLES if not table.valued)
VALUES: tuple[Registry, ...] = tuple(table for table in TABLES if table.valued)


def check_tables(cfg: RunConfig, tables: Sequence[Registry], check_values: Callable[[], None]) -> None:
    """Names against the tables, then the values (`check_values`), then each selected implementation's rules."""
    for table in tables:
        table.check_name(cfg)
    check_values()
    for table in tables:
        table.check_rules(cfg)


def check(cfg: RunConfig) -> RunConfig:
    """The whole run config: every table, every part's values (RunConfig.check), then the grammar."""
    check_tables(cfg, TABLES, cfg.check)
    check_grammar(cfg)  # structured output: the library is there, the schema file reads, the grammar compiles
    return cfg


def check_section(section: str, part: Any) -> Any:
    """One part of a run config (e.g. `generation`) checked as `check` would, the other parts at their defaults."""
    cfg = RunConfig(**{section: part})
    check_tables(cfg, [table for table in TABLES if table.key.startswith(section + ".")], part.check)
    return part
