"""Choose each sequence's next token from its last-position logits."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Union

import torch

from distgen.config import GenerationConfig, seed_ok
from distgen.inputs.grammar import Grammar, record_grammar


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


# The draw's name in a sampled job's settings (outputs.resume): another draw is another job, so a rerun of a job
# sampled by an earlier draw refuses rather than mix two draws' samples.
DRAW = "gumbel-splitmix64"


def as_int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 torch holds."""
    return value - SEED_SPACE if value >= SEED_SPACE // 2 else value


def shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer over int64 tensors (multiplication wraps modulo 2**64, as unsigned arithmetic does)."""
    z = (z ^ shr(z, 30)) * as_int64(MIX1)
    z = (z ^ shr(z, 27)) * as_int64(MIX2)
    return z ^ shr(z, 31)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise (float32) for token `ids` of each row at its completion position `steps`, from the row's 64-bit
    seed: a counter-based draw (no generator state), each value a function of (seed, step, token id) alone:
    u = the top 24 bits of splitmix64(seed + (step * 2**32 + id + 1) * golden) as a number in (0, 1), and
    noise = -log(-log(u)). seeds, steps: (s, 1) int64; ids: (s, c) or (c,) int64 -> (s, c)."""
    counter = (steps << 32) + ids + 1
    z = mix64(seeds + counter * as_int64(GOLDEN))
    u = (shr(z, 40).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature; a tiny temperature overflows a logit to +inf, which is held at fp32's
    largest number (softmax over several +inf would be NaN; the limit is the argmax, ties shared)."""
    return (logits.float() / temperature).clamp(max=torch.finfo(torch.float32).max)


def top_p_drop(logits: torch.Tensor, top_p: Union[float, torch.Tensor], ordered: bool = False) -> torch.Tensor:
    """Where a token falls outside the smallest set whose mass reaches top_p (a number, or (rows, 1) per row):
    a token is dropped once the mass before it already reaches top_p; the best token always stays. `ordered`:
    each row is already sorted, best first (top-k candidates)."""
    if not ordered:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop_sorted = top_p_drop(sorted_logits, top_p, ordered=True)
        return drop_sorted.scatter(-1, order, drop_sorted)
    probs = logits.softmax(-1)
    return (probs.cumsum(-1) - probs) >= top_p


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(top_p_drop(logits, top_p), float("-inf"))
    return logits


@dataclass(frozen=True)
class RowSampling:
    """One sequence's sampling settings: generation.* with its record's overrides applied."""
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    # vLLM's knobs (distgen/engine/logits.py applies them; these defaults are off)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), by token id
    # How the sequence ends (read on the host, after the step's one read: engine.core.Engine.finish_reason)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # What its output record carries: each token's logprob and this many alternatives (None: no logprobs)
    logprobs: Optional[int] = None
    # Its output record's `prompt_logprobs`: each prompt token's logprob and this many alternatives, read from the
    # prefill forward (distgen/engine/prompt_logprobs.py; not a logits-path knob), None: none
    prompt_logprobs: Optional[int] = None
    # What its completion follows (structured output: distgen/engine/grammar.py masks its logits), or None
    grammar: Optional[Grammar] = None

    @property
    def penalized(self) -> bool:
        """Whether its logits need the token history (distgen/engine/logits.py TokenHistory)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    # Read per row of every step (Sampler.needed): worked out once per settings object (a frozen dataclass keeps
    # cached_property's value in its __dict__; fields, equality and hashing are unchanged).
    @cached_property
    def processed(self) -> bool:
        """Whether its logits take the logits path (logits.py) rather than a plain argmax or draw."""
        return (self.penalized or bool(self.logit_bias) or self.min_tokens > 0 or self.logprobs is not None
                or (self.do_sample and self.min_p > 0) or self.grammar is not None)

    @cached_property
    def chooses(self) -> bool:
        """Whether its row needs more than the step's argmax: it samples, or takes the logits path."""
        return self.do_sample or self.processed


# A row that takes the argmax (and draws nothing from its generator).
GREEDY = RowSampling(False, 1.0, 0, 1.0)
# RowSampling's knobs a record may set, each falling back to generation.*'s (the same names in both).
KNOBS = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "logit_bias",
         "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs")
# Those that act on the logits of a step that chooses tokens (the rest act on the host, after the step's read, or,
# prompt_logprobs, on the prefill forward's logits of the prompt positions).
LOGITS_KNOBS = tuple(name for name in KNOBS if name not in ("stop_token_ids", "ignore_eos", "prompt_logprobs"))


def config_knob(cfg: GenerationConfig, name: str):
    """generation.<name> in RowSampling's form (a mapping as sorted pairs, a list as a tuple)."""
    value = getattr(cfg, name)
    if isinstance(value, dict):
        return tuple(sorted((int(k), float(v)) for k, v in value.items()))
    return tuple(dict.fromkeys(value)) if isinstance(value, list) else value


def row_sampling(cfg: GenerationConfig, prompt=None, grammar: Optional[Grammar] = None) -> RowSampling:
    """A record's temperature decides for it: 0 is greedy, > 0 samples (even when generation.do_sample=false);
    generation.temperature=0 is greedy too (whatever generation.do_sample says), as in vLLM. Each knob is the
    record's own where it has one, else generation.*'s (prompt None: generation.* alone); its grammar is its own
    (a json_schema, regex or choice of the record), else `grammar` (generation.*'s, read once by the caller)."""
    def own(name: str):
        return getattr(prompt, name, None)
    temperature = cfg.temperature if own("temperature") is None else own("temperature")
    do_sample = (cfg.do_sample if own("temperature") is None else own("temperature") > 0) and temperature > 0
    knobs = {name: config_knob(cfg, name) if own(name) is None else own(name) for name in KNOBS}
    return RowSampling(do_sample, temperature if temperature > 0 else 1.0,
                       cfg.top_k if own("top_k") is None else own("top_k"),
                       cfg.top_p if own("top_p") is None else own("top_p"), **knobs,
                       grammar=(prompt is not None and record_grammar(prompt)) or grammar)


def sequence_seed(cfg: GenerationConfig, prompt, sample: int = 0) -> int:
    """A record's own seed, else one derived from generation.seed and its index; sample k > 0 of the record
    (generation.n) draws from a stream derived from that seed and k (`sample_seed`). A seed outside
    [0, 2**64) raises ValueError."""
    base = prompt.seed if prompt.seed is not None else prompt_seed(cfg.seed, prompt.index)
    if not seed_ok(base):
        raise ValueError(f"a seed is an integer in [0, 2**64), not {base!r}")
    return sample_seed(base, sample)

