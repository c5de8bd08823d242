"""Request state: one prompt's progress through the engine, and what it hands back when done."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from distgen.inputs.records import Prompt
from distgen.engine.sampling import RowSampling


class Status(enum.Enum):
    WAITING = "waiting"        # queued; holds no cache row yet
    PREFILLING = "prefilling"  # holds a cache row; part of its prompt is still to run (chunked prefill)
    DECODING = "decoding"      # its whole prompt is cached; one new token per decode step
    FINISHED = "finished"      # EOS, budget or a stop string reached; its row is free again


@dataclass
class Request:
    # What to generate
    prompt: Prompt
    token_ids: list[int]
    budget: int
    generator: Optional[torch.Generator]
    sampling: Optional[RowSampling] = None  # generation.* with the record's overrides; None: generation.*
    # Where it is
    status: Status = Status.WAITING
    prefilled: int = 0  # prompt tokens already in the cache
    row: int = -1       # its row (slot) in the KV cache while it holds one
    inflight: int = 0   # tokens of launched steps not read yet (engine.core: the pipelined engine)
    # What it produced
    generated: list[int] = field(default_factory=list)

    @property
    def prompt_length(self) -> int:
        return len(self.token_ids)

    @property
    def unprefilled(self) -> int:
        return len(self.token_ids) - self.prefilled

    @property
    def saturated(self) -> bool:
        """Every token of its budget is launched: no further step needs it (its last tokens may still be landing)."""
        return len(self.generated) + self.inflight >= self.budget


@dataclass(frozen=True)
class Completion:
    prompt: Prompt
    prompt_token_count: int
    token_ids: list[int]
    finish_reason: str  # "eos", "length" or "stop" (a stop string appeared)
