"""Per-prompt checks once the prompts are tokenized: a prompt that cannot be generated gets an
error record (or is truncated, or stops the job, as `dataset.too_long` says) before any worker starts."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence

from distgen.common.errors import ConfigError
from distgen.common.registry import Registry
from distgen.config import MAX_SEQUENCE_TOKENS
from distgen.inputs.records import Prompt

# Config attributes that bound the positions a model can attend over, by architecture family.
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
                       "seq_length", "n_ctx")


@dataclass(frozen=True)
class ContextLimit:
    """Most tokens (prompt plus completion) one sequence may hold; None: no limit known (ALiBi), then
    distgen's own (`TABLE_LIMIT`)."""
    tokens: Optional[int]
    # the config setting it comes from, for messages
    source: str = ""


# What any sequence is held to: the length table counts a prompt plus its budget in int32.
TABLE_LIMIT = ContextLimit(MAX_SEQUENCE_TOKENS, "distgen counts a prompt plus its budget in int32")




def context_limit(config) -> ContextLimit:
    """The model's context from its config (max_position_embeddings or its family's name for it). A sliding
    window does not bound it: a local layer attends over its window wherever the sequence is, past it too
    (distgen/engine/windows.py)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [ContextLimit(getattr(config, key), f"{key}={getattr(config, key)}") for key in POSITION_LIMIT_KEYS
              if isinstance(getattr(config, key, None), int)][:1]
    return min(limits, key=lambda limit: limit.tokens, default=ContextLimit(None))


def too_long_reason(length: int, budget: int, limit: ContextLimit) -> Optional[str]:
    limit = TABLE_LIMIT if limit.tokens is None else limit
    if length + budget <= limit.tokens:
        return None
    return (f"prompt of {length} tokens plus max_new_tokens={budget} exceeds the model's context of "
            f"{limit.tokens} tokens ({limit.source})")


class Verdict(enum.IntEnum):
    """A prompt's fate, as the length table's screen row holds it (an int32)."""
    RUNS = 0          # it is generated
    ERROR_RECORD = 1  # it gets an error record; the job goes on
    FAILS = 2         # the job stops before any generation (dataset.too_long=fail)


# dataset.too_long -> what a prompt that does not fit the model's context becomes (the verdict; truncate_left
# keeps it running, with its oldest tokens dropped, where a token of it still fits).
TOO_LONG: Registry[Verdict] = Registry("dataset.too_long", valued=True)
TOO_LONG.register("error_record", None, Verdict.ERROR_RECORD, doc="an error record; the job goes on")
TOO_LONG.register("truncate_left", None, Verdict.RUNS, doc="its oldest tokens dropped to fit")
TOO_LONG.register("fail", None, Verdict.FAILS, doc="a config error before any worker starts")


@dataclass(frozen=True)
class Screen:
    """One prompt's fate: runs (its first `keep` tokens dropped when truncated), an error record, or fails the job."""
    verdict: Verdict = Verdict.RUNS
    reason: Optional[str] = None
    keep: Optional[int] = None  # truncate_left: keep only the last `keep` tokens


def adapter_problem(name: Optional[str], adapters: Optional[tuple[str, ...]]) -> Optional[str]:
    """Why a record's `lora` names no adapter it can run with (`adapters`: model.lora's names, None when model.lora
    names none: one adapter merged for every record, or none), or None."""
    if name is None:
        return None
    if adapters is None:
        return (f"lora={name!r} is not allowed: model.lora names no adapters (adapters chosen per record are "
                "model.lora={name: <peft folder>, ...} with layout=replicate)")
    if name not in adapters:
        return f"lora={name!r} is not an adapter of model.lora (its adapters: {', '.join(adapters)})"
    return None


def adapter_index(name: Optional[str], adapters: Optional[tuple[str, ...]]) -> int:
    """A record's adapter as a number for the length table: 0 for the base model, k for model.lora's k-th."""
    return adapters.index(name) + 1 if name is not None and adapters and name in adapters else 0


def screen_prompt(prompt: Prompt, length: int, limit: ContextLimit, too_long: str, default_budget: int,
                  adapters: Optional[tuple[str, ...]] = None) -> Screen:
    budget = prompt.budget(default_budget)
    reason = prompt.error or adapter_problem(prompt.lora, adapters) or (None if length else "prompt tokenizes to nothing")
    if reason:
        return Screen(Verdict.ERROR_RECORD, reason)
    too_long_why = too_long_reason(length, budget, limit)
    if not too_long_why:
        return Screen()
    keep = (limit.tokens or TABLE_LIMIT.tokens) - budget
    verdict = TOO_LONG.get(too_long)
    if verdict == Verdict.RUNS and keep >= 1:
        return Screen(keep=keep)
    return Screen(Verdict.FAILS if verdict == Verdict.FAILS else Verdict.ERROR_RECORD, too_long_why)


def too_long_failure(failed: Sequence[str], count: int) -> ConfigError:
    """`failed`: the first few as "id 'x': why"; `count`: how many prompts do not fit."""
    return ConfigError(f"{count} prompts do not fit (dataset.too_long=fail; error_record or "
                       "truncate_left keep the job going): " + "; ".join(failed[:5]))
