"""The sampler seam: logits rows -> next token per row, and which rows hit EOS, on the device."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from distgen.config import GenerationConfig
from distgen.engine.host import upload
from distgen.engine.sampling import RowSampling, select_row_tokens


class Sampler:
    def __init__(self, cfg: GenerationConfig, eos_ids: Sequence[int], device: torch.device):
        # generation.* for a row without settings of its own (temperature 0 is greedy, as row_sampling says)
        self.default = RowSampling(cfg.do_sample and cfg.temperature > 0, cfg.temperature or 1.0, cfg.top_k, cfg.top_p)
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)

    def samples(self, settings: Sequence[Optional[RowSampling]]) -> bool:
        """Whether any row with these settings (None: generation.*) samples rather than takes the argmax."""
        return any((s or self.default).do_sample for s in settings)

    def __call__(self, logits: torch.Tensor, rows: list[int], generators: Sequence[Optional[torch.Generator]],
                 settings: Sequence[Optional[RowSampling]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (logits rows, vocab) -> (tokens, is_eos), both (logits rows,).

        Greedy takes every row's argmax; the planned `rows` that sample (generation.do_sample, or
        their record's own settings) are drawn from their own generators.
        """
        tokens = logits.argmax(dim=-1)
        settings = [s or self.default for s in settings] or [self.default] * len(rows)
        sampled = [k for k, s in enumerate(settings) if s.do_sample]
        if sampled:
            index = upload(torch.tensor([rows[k] for k in sampled], dtype=torch.long), logits.device)
            tokens[index] = select_row_tokens(logits[index], [settings[k] for k in sampled],
                                              [generators[k] for k in sampled])
        return tokens, torch.isin(tokens, self.eos_ids)
