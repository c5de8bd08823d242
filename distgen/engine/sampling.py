"""Choose each sequence's next token from its last-position logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from distgen.config import GenerationConfig


# torch.Generator.manual_seed takes 64-bit seeds.
SEED_SPACE = 2**64


def prompt_seed(seed: int, prompt_index: int) -> int:
    """generation.seed and a prompt's index as one 64-bit seed: seed * 1_000_003 + index, wrapped to 64 bits
    (manual_seed wrapped every value it took the same way, so no earlier seed changes)."""
    return (seed * 1_000_003 + prompt_index) % SEED_SPACE


# splitmix64's constants (Steele, Lea, Flood 2014): the golden-ratio increment and its finalizer's multipliers.
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def sample_seed(base: int, sample: int) -> int:
    """Sample `sample` of a prompt whose own stream is seeded by `base`: sample 0 keeps `base` (what n=1 draws);
    the others a splitmix64 mix of (base, sample), so no two samples, and no sample and another prompt's base,
    share a stream but by a 64-bit accident."""
    if sample == 0:
        return base
    z = (base + sample * GOLDEN) % SEED_SPACE
    z = ((z ^ (z >> 30)) * MIX1) % SEED_SPACE
    z = ((z ^ (z >> 27)) * MIX2) % SEED_SPACE
    return z ^ (z >> 31)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature; a tiny temperature overflows a logit to +inf, which is held at fp32's
    largest number (softmax over several +inf would be NaN; the limit is the argmax, ties shared)."""
    return (logits.float() / temperature).clamp(max=torch.finfo(torch.float32).max)


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
    probs = filter_logits(scale_logits(logits, cfg.temperature), cfg.top_k, cfg.top_p).softmax(-1)
    return torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators)])


@dataclass(frozen=True)
class RowSampling:
    """One sequence's sampling settings: generation.* with its record's overrides applied."""
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float


# A row that takes the argmax (and draws nothing from its generator).
GREEDY = RowSampling(False, 1.0, 0, 1.0)


def row_sampling(cfg: GenerationConfig, prompt) -> RowSampling:
    """A record's temperature decides for it: 0 is greedy, > 0 samples (even when generation.do_sample=false);
    generation.temperature=0 is greedy too (whatever generation.do_sample says), as in vLLM."""
    temperature = cfg.temperature if prompt.temperature is None else prompt.temperature
    do_sample = (cfg.do_sample if prompt.temperature is None else prompt.temperature > 0) and temperature > 0
    return RowSampling(do_sample, temperature if temperature > 0 else 1.0,
                       cfg.top_k if prompt.top_k is None else prompt.top_k,
                       cfg.top_p if prompt.top_p is None else prompt.top_p)


def sequence_generator(cfg: GenerationConfig, prompt, device: torch.device, sample: int = 0) -> torch.Generator:
    """A record's own seed, else one derived from generation.seed and its index; sample k > 0 of the record
    (generation.n) draws from a stream derived from that seed and k (`sample_seed`)."""
    base = prompt.seed if prompt.seed is not None else prompt_seed(cfg.seed, prompt.index)
    return torch.Generator(device=device).manual_seed(sample_seed(base, sample))


def select_row_tokens(logits: torch.Tensor, settings: Sequence[RowSampling],
                      generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """logits: (batch, vocab) -> (batch,); one batched call when every row has the same settings."""
    if len(set(settings)) <= 1:
        return select_next_tokens(logits, settings[0], generators) if settings else logits.argmax(dim=-1)
    return torch.cat([select_next_tokens(row.unsqueeze(0), setting, [gen])
                      for row, setting, gen in zip(logits, settings, generators)])
