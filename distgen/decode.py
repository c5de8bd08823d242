"""Incremental decoding of one batch of prompts, one forward pass per `step`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from distgen.config import GenerationConfig
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


class BatchDecoder:
    """Owns one batch's KV cache and per-sequence state; finished rows ride along as padding."""

    def __init__(self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], cfg: GenerationConfig,
                 pad_id: int, eos_ids: Sequence[int], device: torch.device):
        self.prompts = list(prompts)
        self.prompt_lengths = [len(ids) for ids in token_ids]
        self.cfg = cfg
        self.pad_id = pad_id
        self.device = device
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self.budgets = [p.budget(cfg.max_new_tokens) for p in self.prompts]
        input_ids, attention_mask = left_pad(token_ids, pad_id)
        self.next_input = input_ids.to(device)
        self.attention_mask = attention_mask.to(device)
        self.positions = positions_from_mask(self.attention_mask)
        self.cache = DynamicCache()
        self.generated: list[list[int]] = [[] for _ in self.prompts]
        self.finish_reasons: list[str | None] = [None] * len(self.prompts)
        self.generators = ([prompt_generator(cfg.seed, p.index, device) for p in self.prompts]
                           if cfg.do_sample else None)

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def step(self, model: torch.nn.Module) -> None:
        logits = model(input_ids=self.next_input, attention_mask=self.attention_mask, position_ids=self.positions,
                       cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        next_tokens = select_next_tokens(logits, self.cfg, self.generators)
        is_eos = torch.isin(next_tokens, self.eos_ids).tolist()
        for row, token in enumerate(next_tokens.tolist()):
            if self.finish_reasons[row] is not None:
                continue
            self.generated[row].append(token)
            if is_eos[row]:
                self.finish_reasons[row] = "eos"
            elif len(self.generated[row]) >= self.budgets[row]:
                self.finish_reasons[row] = "length"
        finished = torch.tensor([r is not None for r in self.finish_reasons], device=self.device)
        self.next_input = next_tokens.masked_fill(finished, self.pad_id).unsqueeze(-1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.next_input)], dim=-1)
        self.positions = self.positions[:, -1:] + 1

    def completions(self) -> list[Completion]:
        return [Completion(prompt, length, ids, reason) for prompt, length, ids, reason
                in zip(self.prompts, self.prompt_lengths, self.generated, self.finish_reasons)]
