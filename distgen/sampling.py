"""Choose each sequence's next token from its last-position logits."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from distgen.config import GenerationConfig


def prompt_generator(seed: int, prompt_index: int, device: torch.device) -> torch.Generator:
    """One generator per prompt, so a completion does not depend on its rank or batch."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + prompt_index)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_next_tokens(logits: torch.Tensor, cfg: GenerationConfig,
                       generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """logits: (batch, vocab) -> (batch,) token ids."""
    logits = logits.float()
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators)])
