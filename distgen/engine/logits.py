"""The logits path: the rows of a step that need more than a plain argmax or draw (vLLM's knobs, logprobs, or rows
whose settings differ) go through a list of small functions, all rows at once, their settings as tensors of
per-row parameters (no loop over rows touches the vocabulary). The order is vLLM's (vllm/v1/sample/sampler.py and
its built-in logits processors):

  0. logprobs      the raw model logprobs (log_softmax of the forward's fp32 logits) of the rows that ask
  PROCESSORS (they can change the argmax):
  1. grammar       structured output: each constrained row's tokens its grammar does not allow at -inf (one bitmask
                   of every constrained row, filled on the host by each row's matcher, applied on the device:
                   engine/grammar.py); first, as vLLM applies its grammar bitmask before its sampler
  2. min_tokens    EOS and the row's stop_token_ids at -inf while its completion is shorter than min_tokens
  3. logit_bias    each of the row's biases added to its token's logit
  4. penalties     repetition: a token in the prompt or the completion has its logit divided by the penalty when
                   positive, multiplied when negative (HF generate's RepetitionPenaltyLogitsProcessor too);
                   frequency: minus penalty x the token's count in the completion; presence: minus penalty where
                   that count > 0 (the prompt does not count)
  -- greedy rows take the argmax here; sampled rows go on:
  WARPERS (they never change the argmax):
  5. temperature   logits / temperature, in fp32
  6. min_p         tokens whose probability is below min_p x the best token's dropped
  7. top_k, top_p
  8. the draw      Gumbel-max: the argmax of the warped logits plus each row's Gumbel noise, a function of (the
                   row's seed, its completion position, the token id) alone (sampling.gumbel_noise): no generator
                   state, so a row's draw depends on nothing else in its batch and a resumed row redraws the same;
                   where every sampled row has a top_k, only the best max(top_k) + TIE_SLACK tokens are warped and
                   drawn from (the same tokens the whole vocabulary gives: the others are at -inf)

The token history the penalties read stays on the device (`TokenHistory`: per sequence, which tokens its prompt
holds and how often each token appears in its completion), updated from the step's sampled tokens on the device,
so a pipelined step launched before the previous step's tokens are read sees them (engine.core).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from distgen.engine.grammar import apply_bitmask, step_bitmask
from distgen.engine.host import upload, upload_lists
from distgen.engine.request import Request
from distgen.engine.sampling import RowSampling, as_int64, gumbel_noise, scale_logits, top_p_drop

NEG_INF = float("-inf")
# With top_k: candidates beyond the largest k, kept where they tie with a row's k-th best (top_k keeps ties, as HF's
# TopKLogitsWarper does); more ties than this at one row's k-th value would be left out.
TIE_SLACK = 8


class TokenHistory:
    """Per sequence with a penalty, on the device: its prompt's tokens (a (rows, vocab) bool mask) and how often
    each token appears in its completion ((rows, vocab) int32 counts). A sequence holds a row from its first
    sampled step until it finishes (`Request.history_row`); rows are allocated on first use, growing as needed,
    so a job without penalties holds none."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prompt: Optional[torch.Tensor] = None  # (rows, vocab) bool
        self.counts: Optional[torch.Tensor] = None  # (rows, vocab) int32
        self.free: list[int] = []

    def rows_of(self, requests: Sequence[Request], vocab: int) -> list[int]:
        """Each request's row; a request without one gets one, holding its prompt's tokens and no counts."""
        joining = [r for r in requests if r.history_row < 0]
        if joining:
            self.grow(len(joining), vocab)
            for request in joining:
                request.history_row = self.free.pop()
            self.start([r.history_row for r in joining], [r.token_ids for r in joining], vocab)
        return [r.history_row for r in requests]

    def grow(self, needed: int, vocab: int) -> None:
        if len(self.free) >= needed:
            return
        held = 0 if self.counts is None else len(self.counts)
        rows = max(2 * held, held + needed, 8)
        prompt = torch.zeros((rows, vocab), dtype=torch.bool, device=self.device)
        counts = torch.zeros((rows, vocab), dtype=torch.int32, device=self.device)
        if held:
            prompt[:held], counts[:held] = self.prompt, self.counts
        self.prompt, self.counts = prompt, counts
        self.free = list(range(rows - 1, held - 1, -1)) + self.free

    def start(self, rows: list[int], prompts: list[list[int]], vocab: int) -> None:
        """Clear the rows (a previous tenant's), then mark each one's prompt tokens: one upload."""
        pairs = [(row, token) for row, ids in zip(rows, prompts) for token in set(ids) if 0 <= token < vocab]
        cleared, pair_rows, pair_tokens = upload_lists([rows, [p[0] for p in pairs], [p[1] for p in pairs]],
                                                       torch.long, self.device)
        self.prompt[cleared] = False
        self.counts[cleared] = 0
        self.prompt[pair_rows, pair_tokens] = True

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Each row's sampled token counts once more (on the device; rows are distinct within a step)."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def release(self, request: Request) -> None:
        if request.history_row >= 0:
            self.free.append(request.history_row)
            request.history_row = -1

    def close(self) -> None:
        self.prompt = self.counts = None
        self.free = []


@dataclass
class Penalties:
    """The penalized rows of a batch: where they are in it, their history rows, their three penalties (m, 1), and
    which of the three any row uses (the others' vocabulary-wide ops are skipped)."""
    index: torch.Tensor
    rows: torch.Tensor
    repetition: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    uses: tuple[bool, bool, bool]  # repetition, presence, frequency
    sign: Optional[torch.Tensor] = None  # (m, 1): -1 where a repetition penalty is below 1; None: none is


@dataclass
class Draws:
    """The rows of a batch that sample: where they are in it, their settings as (s, 1) tensors, and their seeds and
    completion positions (s, 1) int64 (what their Gumbel noise is drawn from)."""
    index: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor          # (s, 1) long; 0 (or the vocabulary or more): off
    top_p: torch.Tensor
    min_p: torch.Tensor
    most_k: int                  # the largest top_k in force (0: none)
    any_top_p: bool
    any_min_p: bool
    every_top_k: bool = False    # every row has a top_k: draw from the best most_k + TIE_SLACK tokens only

    def every_row_of(self, logits: torch.Tensor) -> bool:
        """Whether the draw rows are all of `logits`' rows (plan_rows lists them in order)."""
        return self.index.shape[0] == logits.shape[0]


@dataclass
class RowBatch:
    """One step's rows on the logits path (a subset of its logits rows, in this order): per-row parameters."""
    vocab: int
    banned: Optional[tuple[torch.Tensor, torch.Tensor]] = None        # (row, token) pairs at -inf (min_tokens)
    bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (row, token, bias) triples
    penalties: Optional[Penalties] = None
    history: Optional[TokenHistory] = None
    draws: Optional[Draws] = None
    logprob_index: Optional[torch.Tensor] = None  # rows that ask for logprobs
    logprob_top: list[int] = field(default_factory=list)  # their K each, capped at the vocabulary
    # Structured output: the constrained rows (host) and their (rows, ceil(vocab / 32)) int32 bitmask (device)
    grammar: Optional[tuple[list[int], torch.Tensor]] = None

    @property
    def processed(self) -> bool:
        """Whether a processor changes the logits (in place: `choose` needs logits of its own)."""
        return any(part is not None for part in (self.grammar, self.banned, self.bias, self.penalties))


def plan_rows(settings: Sequence[RowSampling], requests: Sequence[Request], eos_ids: Sequence[int], vocab: int,
              history: TokenHistory, device: torch.device) -> RowBatch:
    """The rows' parameters built on the host and uploaded at once (one copy of integers, one of floats)."""
    rows = range(len(settings))
    # 1. min_tokens: a row's completion so far is its tokens read plus those launched but not read yet
    banned = [(k, t) for k, s, r in zip(rows, settings, requests) if len(r.generated) + r.inflight < s.min_tokens
              for t in dict.fromkeys([*eos_ids, *s.stop_token_ids]) if t < vocab]
    bias = [(k, t, b) for k, s in zip(rows, settings) for t, b in s.logit_bias]
    penalized = [k for k, s in zip(rows, settings) if s.penalized]
    history_rows = history.rows_of([requests[k] for k in penalized], vocab) if penalized else []
    sampled = [k for k, s in zip(rows, settings) if s.do_sample]
    top_ks = [settings[k].top_k if 0 < settings[k].top_k < vocab else 0 for k in sampled]
    asking = [k for k, s in zip(rows, settings) if s.logprobs is not None]
    seeds = [as_int64(requests[k].seed) for k in sampled]
    steps = [len(requests[k].generated) + requests[k].inflight for k in sampled]
    ints = [[k for k, _ in banned], [t for _, t in banned], [k for k, _, _ in bias], [t for _, t, _ in bias],
            penalized, history_rows, sampled, top_ks, asking, seeds, steps]
    floats = [[b for _, _, b in bias]]
    floats += [[getattr(settings[k], name) for k in penalized]
               for name in ("repetition_penalty", "presence_penalty", "frequency_penalty")]
    floats += [[getattr(settings[k], name) for k in sampled] for name in ("temperature", "top_p", "min_p")]
    (ban_rows, ban_tokens, bias_rows, bias_tokens, pen_index, pen_rows, draw_index, top_k, ask_index, seed_values,
     step_values) = upload_lists(ints, torch.long, device)
    (bias_values, repetition, presence, frequency, temperature, top_p, min_p) = upload_lists(floats, torch.float32, device)
    batch = RowBatch(vocab, history=history)
    if any(r.matcher is not None for r in requests):
        batch.grammar = grammar_mask(requests, vocab, device)
    if banned:
        batch.banned = (ban_rows, ban_tokens)
    if bias:
        batch.bias = (bias_rows, bias_tokens, bias_values)
    if penalized:
        uses = tuple(any(getattr(settings[k], name) != off for k in penalized) for name, off in (
            ("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)))
        batch.penalties = Penalties(pen_index, pen_rows, repetition[:, None], presence[:, None], frequency[:, None],
                                    uses)
        if any(settings[k].repetition_penalty < 1.0 for k in penalized):
            batch.penalties.sign = torch.where(batch.penalties.repetition < 1.0, -1.0, 1.0)
    if sampled:
        batch.draws = Draws(draw_index, seed_values[:, None], step_values[:, None], temperature[:, None],
                            top_k[:, None], top_p[:, None], min_p[:, None], max(top_ks),
                            any(settings[k].top_p < 1.0 for k in sampled), any(settings[k].min_p > 0 for k in sampled),
                            every_top_k=min(top_ks) > 0)
    if asking:
        batch.logprob_index = ask_index
        batch.logprob_top = [min(settings[k].logprobs, vocab) for k in asking]
    return batch


def grammar_mask(requests: Sequence[Request], vocab: int, device: torch.device) -> tuple[list[int], torch.Tensor]:
    """The constrained rows and their bitmask, filled by each row's matcher on the host, then uploaded (one copy)."""
    # Engine.land_constrained lands a step before the next is scheduled, so each matcher has taken its every token.
    assert all(r.inflight == 0 for r in requests if r.matcher is not None), "a constrained row ran ahead of its matcher"
    rows, bitmask = step_bitmask([r.matcher for r in requests], vocab)
    return rows, upload(bitmask, device)


# ---- PROCESSORS: (logits (rows, vocab) fp32, batch) -> logits; in place where they can be

def mask_grammar(logits: torch.Tensor, batch: RowBatch) -> torch.Tensor:
    if batch.grammar is not None:
        rows, bitmask = batch.grammar
        apply_bitmask(logits, bitmask, rows)
    return logits


def ban_min_tokens(logits: torch.Tensor, batch: RowBatch) -> torch.Tensor:
    if batch.banned is not None:
        logits[batch.banned] = NEG_INF
    return logits


def add_logit_bias(logits: torch.Tensor, batch: RowBatch) -> torch.Tensor:
    if batch.bias is not None:
        rows, tokens, values = batch.bias
        logits.index_put_((rows, tokens), values, accumulate=True)
    return logits


def apply_penalties(logits: torch.Tensor, batch: RowBatch) -> torch.Tensor:
    """vLLM's apply_penalties: repetition over prompt and completion, then frequency and presence over the
    completion; the rows' (m, vocab) history gathered once."""
    p = batch.penalties
    if p is None:
        return logits
    repetition, presence, frequency = p.uses
    counts = batch.history.counts.index_select(0, p.rows)  # (m, vocab) int32 (index_select: a CPU's faster gather)
    generated = counts > 0
    rows = logits.index_select(0, p.index)  # (m, vocab)
    if repetition:
        seen = batch.history.prompt.index_select(0, p.rows)
        seen |= generated
        rows = repetition_penalty(rows, torch.where(seen, p.repetition, 1.0), p.sign)
    if frequency:
        rows -= p.frequency * counts
    if presence:
        rows -= p.presence * generated
    return logits.index_copy_(0, p.index, rows)


def repetition_penalty(logits: torch.Tensor, factor: torch.Tensor, sign: Optional[torch.Tensor]) -> torch.Tensor:
    """A positive logit divided by its factor, a negative one multiplied (1: unchanged, exactly), with no select by
    the logits' sign (a CPU's torch.where is slow on masks that flip at random): for a factor >= 1 the result is the
    smaller of x / f and x * f (rounding keeps both on their side of x), for one < 1 the larger, which
    sign * min(sign * a, sign * b) picks per row (sign -1 where the row's penalty is below 1). Bit for bit what
    where(x > 0, x / f, x * f) gives, as HF's RepetitionPenaltyLogitsProcessor computes."""
    divided, multiplied = logits / factor, logits * factor
    if sign is None:
        return torch.minimum(divided, multiplied)
    return torch.minimum(divided * sign, multiplied * sign) * sign


# ---- WARPERS: (logits of the sampled rows (s, vocab), their draws) -> logits

def apply_min_p(logits: torch.Tensor, draws: Draws) -> torch.Tensor:
    if not draws.any_min_p:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < probs.amax(-1, keepdim=True) * draws.min_p, NEG_INF)


def apply_top_k(logits: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Per row: below its k-th best logit dropped (the k-th of the top most_k: the same value topk(k) gives)."""
    if not draws.most_k:
        return logits
    best = torch.topk(logits, draws.most_k, dim=-1).values  # (s, most_k)
    kth = best.gather(-1, (draws.top_k.clamp(min=1) - 1).clamp(max=draws.most_k - 1))
    kth = torch.where(draws.top_k > 0, kth, NEG_INF)
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, draws: Draws) -> torch.Tensor:
    if not draws.any_top_p:
        return logits
    return logits.masked_fill(top_p_drop(logits, draws.top_p) & (draws.top_p < 1.0), NEG_INF)


Processor = Callable[[torch.Tensor, RowBatch], torch.Tensor]
Warper = Callable[[torch.Tensor, Draws], torch.Tensor]
PROCESSORS: list[Processor] = [mask_grammar, ban_min_tokens, add_logit_bias, apply_penalties]
WARPERS: list[Warper] = [apply_min_p, apply_top_k, apply_top_p]


def draw(logits: torch.Tensor, draws: Draws) -> torch.Tensor:
    """(rows, vocab) processed logits -> (s,) tokens of the draw rows: temperature, the warpers, then each row's
    Gumbel-max draw (see the module docstring); where every row has a top_k, over its best tokens only
    (`candidates`)."""
    rows = logits if draws.every_row_of(logits) else logits.index_select(0, draws.index)
    if draws.every_top_k and draws.most_k + TIE_SLACK < logits.shape[-1]:
        return candidates(rows, draws)
    logits = scale_logits(rows, draws.temperature)
    for warper in WARPERS:
        logits = warper(logits, draws)
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return (logits + gumbel_noise(draws.seeds, draws.steps, ids)).argmax(dim=-1)


def candidates(logits: torch.Tensor, draws: Draws) -> torch.Tensor:
    """The draw over each row's best most_k + TIE_SLACK tokens (sorted, best first; a positive temperature keeps
    the order, so they are found before scaling): temperature, min_p as a logit threshold (probability below
    min_p x the best's), top_k (its k-th best and ties kept), top_p over what is left; the same warpers over the
    whole vocabulary would leave these tokens alone."""
    best = torch.topk(logits, draws.most_k + TIE_SLACK, dim=-1)
    values, ids = scale_logits(best.values, draws.temperature), best.indices
    if draws.any_min_p:
        values = values.masked_fill(values < values[:, :1] + draws.min_p.log(), NEG_INF)
    kth = values.gather(-1, draws.top_k - 1)
    values = values.masked_fill(values < kth, NEG_INF)
    if draws.any_top_p:
        values = values.masked_fill(top_p_drop(values, draws.top_p, ordered=True) & (draws.top_p < 1.0), NEG_INF)
    chosen = (values + gumbel_noise(draws.seeds, draws.steps, ids)).argmax(dim=-1, keepdim=True)
    return ids.gather(-1, chosen).squeeze(-1)


def top_logprobs(raw: torch.Tensor, tokens: torch.Tensor, most: int) -> torch.Tensor:
    """(l, vocab) logprobs, the chosen tokens (l,) -> (l, 1 + 2 * most) float64: the chosen token's logprob, then
    the `most` best tokens' ids, then their logprobs (sorted, best first)."""
    chosen = raw.gather(-1, tokens.unsqueeze(-1))
    if not most:
        return chosen.double()
    best = torch.topk(raw, most, dim=-1)
    return torch.cat([chosen.double(), best.indices.double(), best.values.double()], dim=-1)


def logprob_entry(token: int, block: Sequence[float], k: int, most: Optional[int] = None) -> dict:
    """One position of a `top_logprobs` block, read on the host: {"token_id", "logprob", "top": its k best}
    (`most`: the block's own K, where its width was set by another row's; default k)."""
    most = k if most is None else most
    top = [{"token_id": int(t), "logprob": v} for t, v in zip(block[1:1 + k], block[1 + most:1 + most + k])]
    return {"token_id": token, "logprob": block[0], "top": top}


def choose(logits: torch.Tensor, batch: RowBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(rows, vocab) logits of the batch's rows -> (their tokens (rows,), the logprobs block of the rows that ask
    (`top_logprobs`) or None). The penalized rows' history takes their tokens."""
    logits = logits.float()
    raw = logits.index_select(0, batch.logprob_index).log_softmax(-1) if batch.logprob_index is not None else None
    for processor in PROCESSORS:
        logits = processor(logits, batch)
    if batch.draws is not None and batch.draws.every_row_of(logits):
        tokens = draw(logits, batch.draws)
    else:
        tokens = logits.argmax(dim=-1)
        if batch.draws is not None:
            tokens[batch.draws.index] = draw(logits, batch.draws)
    if batch.penalties is not None:
        batch.history.record(batch.penalties.rows, tokens[batch.penalties.index])
    block = None
    if raw is not None:
        block = top_logprobs(raw, tokens[batch.logprob_index], max(batch.logprob_top))
    return tokens, block
