"""The sampler seam: logits rows -> next token per row, and which rows hit EOS, on the device."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from distgen.config import GenerationConfig
from distgen.sampling import select_next_tokens


class Sampler:
    def __init__(self, cfg: GenerationConfig, eos_ids: Sequence[int], device: torch.device):
        self.cfg = cfg
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor, rows: list[int],
                 generators: Sequence[Optional[torch.Generator]]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (logits rows, vocab) -> (tokens, is_eos), both (logits rows,).

        Greedy takes every row's argmax; sampling draws the planned `rows` from their own generators.
        """
        tokens = logits.argmax(dim=-1)
        if self.cfg.do_sample:
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            tokens[index] = select_next_tokens(logits[index], self.cfg, generators)
        return tokens, torch.isin(tokens, self.eos_ids)
