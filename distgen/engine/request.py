"""Request state: one prompt's progress through the engine, and what it hands back when done."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from distgen.inputs.records import Prompt
from distgen.engine.sampling import RowSampling


class RequestFailed(Exception):
    """One request cannot go on, for a reason of its own record (its seed cannot seed a generator, its tokens
    cannot be decoded, its prompt cannot be tokenized): it becomes an error record and the rank goes on.
    Raised only around calls whose input is that one record, never around a batched forward."""


class Status(enum.Enum):
    WAITING = "waiting"        # queued; holds no cache row yet
    PREFILLING = "prefilling"  # holds a cache row; part of its prompt is still to run (chunked prefill)
    DECODING = "decoding"      # its whole prompt is cached; one new token per decode step
    FINISHED = "finished"      # EOS, budget, a stop string reached, or failed; its row is free again


@dataclass(frozen=True)
class PrefixShare:
    """Where a waiting request's first prompt tokens are held (engine.prefix): slot `slot`'s columns 0..tokens-1;
    `in_place`: a freed slot the request itself takes (nothing copied)."""
    slot: int
    tokens: int
    in_place: bool = False


@dataclass
class Request:
    # What to generate
    prompt: Prompt
    token_ids: list[int]
    budget: int
    seed: Optional[int]  # its 64-bit sampling seed (engine.sampling.sequence_seed); None: it does not sample
    sampling: Optional[RowSampling] = None  # generation.* with the record's overrides; None: generation.*
    # Assisted generation's acceptance draws (engine.assist), seeded by `seed`; None elsewhere
    generator: Optional[torch.Generator] = field(default=None, compare=False, repr=False)
    sample: int = 0  # which of its prompt's completions (generation.n) this is: its sample_index
    # Where it is
    status: Status = Status.WAITING
    prefilled: int = 0  # prompt tokens already in the cache
    row: int = -1       # its row (slot) in the KV cache while it holds one
    inflight: int = 0   # tokens of launched steps not read yet (engine.core: the pipelined engine)
    # Shared prefix (engine.prefix): waiting, the slot that holds its first `prefilled` prompt tokens (copied at
    # admission); once admitted, how many prompt tokens it took from there instead of prefilling them.
    share: Optional["PrefixShare"] = field(default=None, compare=False, repr=False)
    shared: int = 0
    prefix_keys: Optional[list] = field(default=None, compare=False, repr=False)  # engine.prefix's keys, made once
    history_row: int = -1  # its row of the sampler's token history while a penalty needs one (engine.logits)
    # Its grammar's matcher (structured output, engine.grammar: an xgrammar GrammarMatcher), which takes each of its
    # tokens once read; None: unconstrained.
    matcher: Optional[Any] = field(default=None, compare=False, repr=False)
    # What it produced
    generated: list[int] = field(default_factory=list)
    # per generated token {"token_id", "logprob", "top": [...]} when its settings ask for logprobs, else None
    logprobs: Optional[list[dict]] = None
    # its prompt logprobs' blocks on the device, one per prompt chunk (engine.prompt_logprobs) when its settings ask
    # for prompt logprobs, else None
    prompt_blocks: Optional[list[torch.Tensor]] = field(default=None, compare=False, repr=False)
    error: Optional[str] = None  # why it failed (RequestFailed), finishing with reason "error"

    @property
    def prompt_length(self) -> int:
        return len(self.token_ids)

    @property
    def unprefilled(self) -> int:
        return len(self.token_ids) - self.prefilled

    def completion(self, reason: str, prompt_logprobs: Optional[list] = None) -> "Completion":
        """prompt_logprobs: its prompt logprobs as the host read them (engine.prompt_logprobs.entries), if asked."""
        if self.error is not None:
            return Completion(self.prompt, self.prompt_length, [], reason, self.error, self.sample)
        return Completion(self.prompt, self.prompt_length, self.generated, reason, sample=self.sample,
                          logprobs=self.logprobs, sampled=self.seed is not None, prompt_logprobs=prompt_logprobs)

    @property
    def saturated(self) -> bool:
        """Every token of its budget is launched: no further step needs it (its last tokens may still be landing)."""
        return len(self.generated) + self.inflight >= self.budget


@dataclass(frozen=True)
class Completion:
    prompt: Prompt
    prompt_token_count: int
    token_ids: list[int]
    finish_reason: str  # "eos", "length", "stop" (a stop string or a stop token id appeared) or "error" (failed)
    error: Optional[str] = None  # why it failed: it becomes an error record
    sample: int = 0  # its sample_index (generation.n)
    logprobs: Optional[list[dict]] = None  # per token in token_ids, when asked (Request.logprobs)
    sampled: bool = False  # its tokens were drawn (temperature > 0), not chosen greedily
    # per prompt token (the first None) {"token_id", "logprob", "top": [...]}, when asked (engine.prompt_logprobs)
    prompt_logprobs: Optional[list] = None
