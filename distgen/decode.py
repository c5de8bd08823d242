"""Incremental decoding of a rank's prompts, one forward pass per `step`."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from transformers import DynamicCache

from distgen.config import GenerationConfig
from distgen.forward_args import position_kwargs
from distgen.kv_rows import append_rows, select_rows, trim_dead_columns
from distgen.prompts import Prompt
from distgen.sampling import prompt_generator, select_next_tokens


@dataclass(frozen=True)
class Completion:
    prompt: Prompt
    prompt_token_count: int
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"


def left_pad(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts each row, so positions count real tokens only (as HF generate does)."""
    positions = attention_mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@dataclass
class ActiveSequence:
    prompt: Prompt
    prompt_length: int
    budget: int
    generator: Optional[torch.Generator]
    generated: list[int] = field(default_factory=list)

    def finish_reason(self, is_eos: bool) -> Optional[str]:
        if is_eos:
            return "eos"
        return "length" if len(self.generated) >= self.budget else None


class RollingBatch:
    """Up to `max_rows` sequences sharing one left-padded KV cache, one forward per `step`.

    A finished sequence leaves the batch at once. Queued prompts join with a prefill step:
    with `refill` (continuous batching) whenever a row is free, otherwise only once the whole
    batch is done (static batches).
    """

    def __init__(self, queue: Iterable[tuple[Prompt, Sequence[int]]], cfg: GenerationConfig, pad_id: int,
                 eos_ids: Sequence[int], device: torch.device, max_rows: int, refill: bool):
        self.queue = deque(queue)
        self.cfg, self.pad_id, self.device, self.max_rows, self.refill = cfg, pad_id, device, max_rows, refill
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self.active: list[ActiveSequence] = []
        self.cache = DynamicCache()
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.next_input = torch.zeros((0, 1), dtype=torch.long, device=device)

    @property
    def has_work(self) -> bool:
        return bool(self.active or self.queue)

    def joining_count(self) -> int:
        free = self.max_rows - len(self.active)
        if not self.queue or free == 0 or (self.active and not self.refill):
            return 0
        return min(free, len(self.queue))

    def step(self, model: torch.nn.Module) -> list[Completion]:
        """One forward; returns the sequences it finished."""
        count = self.joining_count()
        return self.prefill(model, count) if count else self.decode(model)

    def prefill(self, model: torch.nn.Module, count: int) -> list[Completion]:
        joining = [self.queue.popleft() for _ in range(count)]
        input_ids, mask = left_pad([ids for _, ids in joining], self.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        logits = self.forward(model, input_ids, mask, positions_from_mask(mask), cache)
        sequences = [ActiveSequence(prompt, len(ids), prompt.budget(self.cfg.max_new_tokens),
                                    prompt_generator(self.cfg.seed, prompt.index, self.device)
                                    if self.cfg.do_sample else None) for prompt, ids in joining]
        return self.advance(sequences, logits, cache, mask, joining=True)

    def decode(self, model: torch.nn.Module) -> list[Completion]:
        self.mask = torch.cat([self.mask, torch.ones_like(self.next_input)], dim=-1)
        positions = self.mask.sum(dim=-1, keepdim=True) - 1
        logits = self.forward(model, self.next_input, self.mask, positions, self.cache)
        return self.advance(self.active, logits, self.cache, self.mask, joining=False)

    @staticmethod
    def forward(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
        """Last-position logits, (rows, vocab)."""
        return model(input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1,
                     **position_kwargs(model, positions)).logits[:, -1, :]

    def advance(self, sequences: list[ActiveSequence], logits: torch.Tensor, cache: DynamicCache,
                mask: torch.Tensor, joining: bool) -> list[Completion]:
        generators = [s.generator for s in sequences] if self.cfg.do_sample else None
        tokens = select_next_tokens(logits, self.cfg, generators)
        finished, kept = [], []
        for row, (sequence, token, is_eos) in enumerate(
                zip(sequences, tokens.tolist(), torch.isin(tokens, self.eos_ids).tolist())):
            sequence.generated.append(token)
            reason = sequence.finish_reason(is_eos)
            if reason:
                finished.append(Completion(sequence.prompt, sequence.prompt_length, sequence.generated, reason))
            else:
                kept.append(row)
        if len(kept) < len(sequences):
            rows = torch.tensor(kept, dtype=torch.long, device=self.device)
            mask, tokens = select_rows(cache, mask, rows), tokens[rows]
        survivors = [sequences[row] for row in kept]
        if joining and self.active:
            self.mask = append_rows(self.cache, self.mask, cache, mask)
            self.active = self.active + survivors
            self.next_input = torch.cat([self.next_input, tokens.unsqueeze(-1)])
        else:
            self.cache, self.mask, self.active, self.next_input = cache, mask, survivors, tokens.unsqueeze(-1)
        self.mask = trim_dead_columns(self.cache, self.mask)
        return finished
