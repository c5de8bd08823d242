"""Per-prompt checks once the prompts are tokenized: a prompt that cannot be generated gets an
error record (or is truncated, or stops the job, as `dataset.too_long` says) before any worker starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from distgen.errors import ConfigError
from distgen.prompts import Prompt

# Config attributes that bound the positions a model can attend over, by architecture family.
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
                       "seq_length", "n_ctx")


@dataclass(frozen=True)
class ContextLimit:
    """Most tokens (prompt plus completion) one sequence may hold; None: no limit known (ALiBi)."""
    tokens: Optional[int]
    # the config setting it comes from, for messages
    source: str = ""


@dataclass
class Screened:
    token_ids: list[list[int]]
    # prompt index -> why it gets an error record instead of a completion
    rejected: dict[int, str] = field(default_factory=dict)


def sliding_window(config) -> Optional[int]:
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def context_limit(config) -> ContextLimit:
    """The model's context from its config. Sliding-window models are held to their window: distgen's
    left-padded, column-trimmed KV cache counts the window in cache columns, not in tokens, so a
    sequence longer than the window would attend to the wrong tokens (refused rather than wrong)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [ContextLimit(getattr(config, key), f"{key}={getattr(config, key)}") for key in POSITION_LIMIT_KEYS
              if isinstance(getattr(config, key, None), int)][:1]
    window = sliding_window(config)
    if window is not None:
        limits.append(ContextLimit(window, f"sliding_window={window}; distgen does not batch past the window"))
    return min(limits, key=lambda limit: limit.tokens, default=ContextLimit(None))


def too_long_reason(length: int, budget: int, limit: ContextLimit) -> Optional[str]:
    if limit.tokens is None or length + budget <= limit.tokens:
        return None
    return (f"prompt of {length} tokens plus max_new_tokens={budget} exceeds the model's context of "
            f"{limit.tokens} tokens ({limit.source})")


def screen_prompts(prompts: Sequence[Prompt], token_ids: Sequence[list[int]], limit: ContextLimit, too_long: str,
                   default_budget: int) -> Screened:
    screened = Screened([list(ids) for ids in token_ids])
    failed = []
    for prompt, ids in zip(prompts, screened.token_ids):
        budget = prompt.budget(default_budget)
        reason = prompt.error or (None if ids else "prompt tokenizes to nothing")
        too_long_why = None if reason else too_long_reason(len(ids), budget, limit)
        keep = (limit.tokens or 0) - budget
        if too_long_why and too_long == "truncate_left" and keep >= 1:
            screened.token_ids[prompt.index] = ids[-keep:]
        elif too_long_why and too_long == "fail":
            failed.append(f"id {prompt.id!r}: {too_long_why}")
        else:
            reason = reason or too_long_why
        if reason:
            screened.rejected[prompt.index] = reason
    if failed:
        raise ConfigError(f"{len(failed)} prompts do not fit (dataset.too_long=fail; error_record or "
                          "truncate_left keep the job going): " + "; ".join(failed[:5]))
    return screened
