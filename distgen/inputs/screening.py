"""Per-prompt checks once the prompts are tokenized: a prompt that cannot be generated gets an
error record (or is truncated, or stops the job, as `dataset.too_long` says) before any worker starts."""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class Screened:
    token_ids: list[list[int]]
    # prompt index -> why it gets an error record instead of a completion
    rejected: dict[int, str] = field(default_factory=dict)


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


# What the length table's screen column holds for a prompt.
RUNS, ERROR_RECORD, FAILS = 0, 1, 2
# dataset.too_long -> what a prompt that does not fit the model's context becomes (the verdict; truncate_left
# keeps it running, with its oldest tokens dropped, where a token of it still fits).
TOO_LONG: Registry[int] = Registry("dataset.too_long", valued=True)
TOO_LONG.register("error_record", None, ERROR_RECORD, doc="an error record; the job goes on")
TOO_LONG.register("truncate_left", None, RUNS, doc="its oldest tokens dropped to fit")
TOO_LONG.register("fail", None, FAILS, doc="a config error before any worker starts")


@dataclass(frozen=True)
class Screen:
    """One prompt's fate: runs (its first `keep` tokens dropped when truncated), an error record, or fails the job."""
    verdict: int = RUNS
    reason: Optional[str] = None
    keep: Optional[int] = None  # truncate_left: keep only the last `keep` tokens


def screen_prompt(prompt: Prompt, length: int, limit: ContextLimit, too_long: str, default_budget: int) -> Screen:
    budget = prompt.budget(default_budget)
    reason = prompt.error or (None if length else "prompt tokenizes to nothing")
    if reason:
        return Screen(ERROR_RECORD, reason)
    too_long_why = too_long_reason(length, budget, limit)
    if not too_long_why:
        return Screen()
    keep = (limit.tokens or TABLE_LIMIT.tokens) - budget
    verdict = TOO_LONG.get(too_long)
    if verdict == RUNS and keep >= 1:
        return Screen(keep=keep)
    return Screen(FAILS if verdict == FAILS else ERROR_RECORD, too_long_why)


def too_long_failure(failed: Sequence[str], count: int) -> ConfigError:
    """`failed`: the first few as "id 'x': why"; `count`: how many prompts do not fit."""
    return ConfigError(f"{count} prompts do not fit (dataset.too_long=fail; error_record or "
                       "truncate_left keep the job going): " + "; ".join(failed[:5]))


def screen_prompts(prompts: Sequence[Prompt], token_ids: Sequence[list[int]], limit: ContextLimit, too_long: str,
                   default_budget: int) -> Screened:
    screened = Screened([list(ids) for ids in token_ids])
    failed = []
    for k, (prompt, ids) in enumerate(zip(prompts, screened.token_ids)):
        screen = screen_prompt(prompt, len(ids), limit, too_long, default_budget)
        if screen.keep is not None:
            screened.token_ids[k] = ids[-screen.keep:]
        if screen.verdict == FAILS:
            failed.append(f"id {prompt.id!r}: {screen.reason}")
        elif screen.verdict == ERROR_RECORD:
            screened.rejected[prompt.index] = screen.reason
    if failed:
        raise too_long_failure(failed, len(failed))
    return screened
