"""Assisted (speculative) generation: a proposer drafts tokens, the main model checks them all in one forward.

An assisted decode step replaces the engine's decode step for every decoding row:
  1. draft: each row gets up to k draft tokens (a small draft model run k times, or an n-gram
     match in the row's own text: prompt lookup);
  2. verify: ONE main forward over [last token, d_1 .. d_k] per row (left-padded to the longest
     draft) returns the main model's logits after each of those k + 1 tokens;
  3. accept: the longest agreeing prefix d_1 .. d_a is kept, plus one token of the main model
     (so a step always emits 1 .. k + 1 tokens); budgets, EOS and stop strings cut it exactly;
  4. rewind: the KV cache drops each row's rejected columns (slot cache: its length is set back
     and the columns stay masked until overwritten; dynamic cache: masked and rolled out to the
     left), and the draft model's cache likewise.

Lockstep layouts (fsdp, zero3): an assisted step makes exactly one main forward, like a plain
decode step, so an idle rank's one dummy forward still matches it (FSDP's all-gathers and
ZeRO-3's parameter gathers do not depend on the input's shape). The draft model is small and
replicated on every rank, never sharded: its forwards hold no collectives, so ranks may run
different numbers of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Callable, Optional, Protocol, Sequence

import torch

from distgen.common.checks import require
from distgen.common.registry import Registry
from distgen.config import GenerationConfig
from distgen.engine.host import read
from distgen.engine.kv.base import KVCache
from distgen.engine.kv.slots import SlotKV
from distgen.engine.prompt_logprobs import entries
from distgen.engine.request import Completion, Request, Status
from distgen.engine.runner import Runner
from distgen.models.forward_args import model_inputs
from distgen.models.loading import load_model
from distgen.models.tiny import build_tiny_model
from distgen.engine.sampling import LOGITS_KNOBS, RowSampling, filter_logits, scale_logits

# (a request that took a token, whether it is an EOS token) -> why it finished, or None (Engine.finish_reason)
FinishReason = Callable[[Request, bool], Optional[str]]
# The heuristic schedule grows a sequence's draft length up to this many tokens.
HEURISTIC_MAX_DRAFT = 16


@dataclass(frozen=True)
class DraftSchedule:
    # generation.num_assistant_tokens -> the most draft tokens a row proposes in one step
    longest: Callable[[int], int]
    # (a row's draft length, tokens it proposed, tokens accepted, the longest) -> its next draft length
    next_length: Callable[[int, int, int, int], int]


def heuristic_length(length: int, proposed: int, accepted: int, longest: int) -> int:
    """+2 after a fully accepted round, -1 otherwise, within 1..longest (a round that proposed nothing: unchanged)."""
    if not proposed:
        return length
    return min(longest, length + 2) if accepted == proposed else max(1, length - 1)


# generation.assistant_schedule: how a row's draft length moves from round to round.
DRAFT_SCHEDULES: Registry[DraftSchedule] = Registry("generation.assistant_schedule", valued=True)
DRAFT_SCHEDULES.register("constant", None, DraftSchedule(lambda start: start, lambda length, *_: length),
                         doc="every round proposes generation.num_assistant_tokens")
DRAFT_SCHEDULES.register("heuristic", None, DraftSchedule(lambda start: max(start, HEURISTIC_MAX_DRAFT),
                                                          heuristic_length),
                         doc=f"+2 after a fully accepted round, -1 otherwise, per sequence (1..{HEURISTIC_MAX_DRAFT})")


def max_draft_tokens(gen: GenerationConfig) -> int:
    """The most draft tokens one row proposes in one step (a verify forward then runs this + 1 per row)."""
    return DRAFT_SCHEDULES.get(gen.assistant_schedule).longest(gen.num_assistant_tokens)


@dataclass
class Draft:
    """One row's proposal for one step."""
    tokens: list[int]
    # (len(tokens), vocab): the draft's distribution q each token was drawn from (sampling rows of a
    # draft model); None: a deterministic proposal (greedy draft, prompt lookup), q = one-hot.
    probs: Optional[torch.Tensor] = None


@dataclass
class SequenceState:
    """What the assistant keeps per running request."""
    draft_length: int  # tokens to propose next step (the schedule moves it)
    cached: int = 0    # leading tokens of prompt + generated held in the draft model's cache


@dataclass
class AssistCounters:
    proposed: int = 0  # draft tokens the main model checked
    accepted: int = 0  # of those, kept
    steps: int = 0     # assisted decode steps (one main forward each)


def sequence_of(request: Request) -> list[int]:
    return request.token_ids + request.generated


def token_probs(logits: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """(..., vocab) logits -> the distribution a sampled row draws from (temperature, top-k, top-p)."""
    return filter_logits(scale_logits(logits, sampling.temperature), sampling.top_k, sampling.top_p).softmax(-1)


def draft_prob(logits: torch.Tensor, q: Optional[torch.Tensor], token: int) -> float:
    """The draft's probability of the token it drew: from q when it sampled, else softmax(logits)."""
    return read((q if q is not None else logits.float().softmax(-1))[token])


# --- Proposers: who drafts -------------------------------------------------------------------

class Proposer(Protocol):
    def propose(self, requests: list[Request], lengths: list[int], states: list[SequenceState],
                confidence: Optional[float]) -> list[Draft]: ...

    def kept(self, state: SequenceState, length: int) -> None:
        """The first `length` tokens of the sequence are final (the rest of the last draft was rejected)."""


def lookup_ngram(sequence: Sequence[int], max_ngram: int, count: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
    n tokens (the longest n <= max_ngram that occurs), at most `count` of them."""
    for n in range(min(max_ngram, len(sequence) - 1), 0, -1):
        tail = list(sequence[-n:])
        for start in range(len(sequence) - n - 1, -1, -1):
            if list(sequence[start:start + n]) == tail:
                return list(sequence[start + n:start + n + count])
    return []


class PromptLookup:
    """Drafts by n-gram matching in the row's own prompt and generated text; no draft model."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def propose(self, requests, lengths, states, confidence) -> list[Draft]:
        return [Draft(lookup_ngram(sequence_of(r), self.max_ngram, k) if k else []) for r, k in zip(requests, lengths)]

    def kept(self, state: SequenceState, length: int) -> None:
        pass


class DraftModel:
    """A small causal LM with its own slot cache (same slots as the main cache's rows).

    A row's draft cache catches up lazily: the first step of a request feeds its whole prompt (the
    draft's prefill), later steps feed the one or two tokens the last verify settled.
    """

    def __init__(self, model: torch.nn.Module, kv: SlotKV, chunk_tokens: Optional[int] = None):
        """chunk_tokens: the most tokens of one row a catch-up forward feeds (scheduler=chunked's
        prefill_chunk_tokens, so the draft's prefill memory stays bounded too); None: no limit."""
        self.model, self.kv, self.chunk_tokens = model, kv, chunk_tokens

    @torch.no_grad()
    def forward(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """(rows, vocab): the draft's logits after each chunk."""
        inputs = self.kv.chunk_inputs(slots, chunks, starts, keep=1)
        return self.model(**model_inputs(self.model, inputs)).logits[:, -1, :]

    def propose(self, requests, lengths, states, confidence) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        active = [i for i, k in enumerate(lengths) if k > 0]
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        # 1. catch up: feed each drafting row what its draft cache lacks (the whole prompt the first time)
        for i in active:
            if states[i].cached == 0:
                self.kv.col_pos[requests[i].row] = -1  # the slot's previous tenant is not this row's past
        self.catch_up([requests[i] for i in active], [states[i] for i in active])
        chunks = [sequence_of(requests[i])[states[i].cached:] for i in active]
        starts = [states[i].cached for i in active]
        feeding = active
        while feeding:
            logits = self.forward([requests[i].row for i in feeding], chunks, starts)
            for i, chunk, start in zip(feeding, chunks, starts):
                states[i].cached = start + len(chunk)
            # 2. each row draws its next draft token; it stops at its length or below the confidence
            next_rows, greedy = [], read(logits.argmax(dim=-1))  # one device->host copy for greedy rows
            for i, row_logits, token in zip(feeding, logits, greedy):
                sampling = requests[i].sampling
                q = None
                if sampling is not None and sampling.do_sample:
                    q = token_probs(row_logits, sampling)
                    token = read(torch.multinomial(q, 1, generator=requests[i].generator))[0]
                    probs[i].append(q)
                drafts[i].tokens.append(token)
                sure = confidence is None or draft_prob(row_logits, q, token) >= confidence
                if len(drafts[i].tokens) < lengths[i] and sure:
                    next_rows.append(i)
            # 3. the rows still drafting feed the token they just drew
            feeding = next_rows
            chunks = [[drafts[i].tokens[-1]] for i in feeding]
            starts = [states[i].cached for i in feeding]
        for i in active:
            if probs[i]:
                drafts[i].probs = torch.stack(probs[i])
        return drafts

    def catch_up(self, requests: list[Request], states: list[SequenceState]) -> None:
        """Feed rows more than a chunk behind in chunks (all but the last one, whose logits the draft needs)."""
        limit = self.chunk_tokens
        while limit:
            behind = [(r, s) for r, s in zip(requests, states) if len(sequence_of(r)) - s.cached > limit]
            if not behind:
                return
            self.forward([r.row for r, _ in behind], [sequence_of(r)[s.cached:s.cached + limit] for r, s in behind],
                         [s.cached for _, s in behind])
            for _, state in behind:
                state.cached += limit

    def kept(self, state: SequenceState, length: int) -> None:
        state.cached = min(state.cached, length)


# --- Accept rules ----------------------------------------------------------------------------

def accept_greedy(targets: list[int], drafts: list[int]) -> tuple[list[int], int]:
    """targets[j]: the main model's argmax after draft token j (targets[0]: after the last real token).

    Keep drafts while each equals the argmax before it; then the main model's own token. The emitted
    tokens are exactly what plain greedy decoding would produce.
    """
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return drafts[:accepted] + [targets[accepted]], accepted


def accept_sampled(p: torch.Tensor, q: Optional[torch.Tensor], drafts: list[int],
                   generator: Optional[torch.Generator]) -> tuple[list[int], int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    p: (k + 1, vocab) the main model's distributions at each draft position and after the last
    draft; q: (k, vocab) the draft's distributions each draft token was drawn from (None: one-hot on
    the draft token, a deterministic proposal). The emitted tokens follow p exactly:
      - draft token d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j));
      - on the first rejection, the replacement is drawn from norm(max(0, p_j - q_j)) and the step ends;
      - when all k are accepted, one more token is drawn from p_k.
    """
    for j, token in enumerate(drafts):
        q_token = read(q[j, token]) if q is not None else 1.0
        u = read(torch.rand((), generator=generator, device=p.device))
        if u * q_token < read(p[j, token]):  # u < p/q without dividing by a tiny q
            continue
        q_row = q[j] if q is not None else torch.nn.functional.one_hot(torch.tensor(token, device=p.device),
                                                                       p.shape[-1]).to(p.dtype)
        residual = (p[j] - q_row).clamp(min=0)
        residual = residual if read(residual.sum()) > 0 else p[j]  # p == q: a rejection had probability 0
        replacement = read(torch.multinomial(residual / residual.sum(), 1, generator=generator))[0]
        return drafts[:j] + [replacement], j
    return drafts + [read(torch.multinomial(p[len(drafts)], 1, generator=generator))[0]], len(drafts)


# --- The assisted decode step ----------------------------------------------------------------

class Assistant:
    """Runs an engine's decode steps as draft -> verify (one main forward) -> accept -> rewind."""

    def __init__(self, proposer: Proposer, gen: GenerationConfig, eos_ids: Sequence[int]):
        self.proposer = proposer
        self.start_length, self.schedule = gen.num_assistant_tokens, DRAFT_SCHEDULES.get(gen.assistant_schedule)
        self.max_length = max_draft_tokens(gen)
        self.confidence = gen.assistant_confidence_threshold
        self.eos = set(eos_ids)
        # By id(request), holding the request so its id is not reused while the entry lives: an
        # out-of-memory back-off requeues running prompts as new requests, which start afresh.
        self.states: dict[int, tuple[Request, SequenceState]] = {}
        self.counters = AssistCounters()

    def track(self, requests: list[Request]) -> list[SequenceState]:
        """Each decoding request's state (new ones start afresh); requests no longer decoding are dropped."""
        known = self.states
        self.states = {id(r): known[id(r)] if id(r) in known else (r, SequenceState(self.start_length))
                       for r in requests}
        return [state for _, state in self.states.values()]

    def step(self, kv: KVCache, runner: Runner, finish_reason: FinishReason,
             requests: list[Request]) -> list[Completion]:
        """One assisted decode step of the engine's decoding `requests` over its cache and runner; `finish_reason`
        (Engine.finish_reason) says when a request is done. The finished ones are marked FINISHED and returned (the
        engine drops them from its running list)."""
        states = self.track(requests)
        # 1. draft: never past the budget (the verify adds one token of its own)
        lengths = [min(s.draft_length, r.budget - len(r.generated) - 1) for r, s in zip(requests, states)]
        drafts = self.proposer.propose(requests, lengths, states, self.confidence)
        # 2. verify: one main forward over [last, d_1..d_k] per row; logits after each of them
        chunks = [[r.generated[-1], *d.tokens] for r, d in zip(requests, drafts)]
        keep = max(len(c) for c in chunks)
        inputs = kv.verify_inputs(requests, chunks, keep)
        with runner.context(inputs):  # no_grad, and generation.autocast when set
            logits = runner.model(**model_inputs(runner.model, inputs)).logits  # (rows, keep, vocab)
        logits = runner.fp32_logits(logits)
        self.counters.steps += 1
        # 3. accept, row by row; rows are left-padded, so row i's k + 1 logits are its last ones
        targets = read(logits.argmax(dim=-1))  # (rows, keep): one device->host copy for the greedy rows
        completions, finished, kept, done = [], [], [], []
        for i, (request, draft, state) in enumerate(zip(requests, drafts, states)):
            k = len(draft.tokens)
            sampling = request.sampling
            if sampling is not None and sampling.do_sample:
                p = token_probs(logits[i, keep - k - 1:], sampling)
                emitted, accepted = accept_sampled(p, draft.probs, draft.tokens, request.generator)
            else:
                emitted, accepted = accept_greedy(targets[i][keep - k - 1:], draft.tokens)
            self.counters.proposed += k
            self.counters.accepted += accepted
            state.draft_length = self.schedule.next_length(state.draft_length, k, accepted, self.max_length)
            # 4. take the emitted tokens one at a time: EOS, a stop string or the budget cuts them exactly
            kept.append(1 + accepted)  # cached now: the last input and the accepted drafts
            reason = self.take(finish_reason, request, emitted)
            done.append(reason is not None)
            if reason:
                completions.append(request.completion(reason, entries(request)))
                finished.append(request)
                self.states.pop(id(request))
            else:
                self.proposer.kept(state, len(sequence_of(request)) - 1)
        # 5. rewind: a row caches its last input and the accepted drafts; its next input is the main model's token
        kv.verified(requests, chunks, kept, done)
        for request in finished:
            request.status, request.row = Status.FINISHED, -1
        return completions

    def take(self, finish_reason: FinishReason, request: Request, tokens: list[int]) -> Optional[str]:
        for token in tokens:
            request.generated.append(token)
            reason = finish_reason(request, token in self.eos)
            if reason:
                return reason
        return None


@dataclass(frozen=True)
class AssistantSpec:
    """What the worker hands the engine builder: the assistant's name and, for tiny/draft, the draft model."""
    name: str
    draft: Optional[torch.nn.Module] = None


def build_tiny_draft(model_cfg, tokenizer, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    return build_tiny_model(replace(model_cfg.tiny, seed=model_cfg.assistant_seed), tokenizer).to(dtype).to(device)


def build_draft_model(model_cfg, tokenizer, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """model.assistant=draft: the folder's model, loaded whole on this rank (replicated, never sharded)."""
    cfg = replace(model_cfg, source="pretrained", path=model_cfg.assistant_path, quantization="none",
                  assistant="none", assistant_path=None)
    return load_model(cfg, tokenizer, device).to(dtype).to(device)


def check_plain_logits(cfg) -> None:
    """Drafts are verified against the model's plain logits: generation's logits-path knobs (vLLM's penalties,
    logit_bias, min_tokens, min_p, logprobs) are refused with an assistant (a record's own: engine.build)."""
    defaults = GenerationConfig()
    for name in LOGITS_KNOBS:
        value = getattr(cfg.generation, name)
        require(value == getattr(defaults, name), f"generation.{name}", value,
                f"model.assistant={cfg.model.assistant} verifies drafts against the model's plain logits; leave "
                f"generation.{name} at {json.dumps(getattr(defaults, name))} or use model.assistant=none")


def check_draft_model(cfg) -> None:
    """model.assistant=draft needs its folder."""
    require(bool(cfg.model.assistant_path), "model.assistant_path", cfg.model.assistant_path,
            "model.assistant=draft needs model.assistant_path=<local draft model folder>")
    check_plain_logits(cfg)


# model.assistant: who proposes draft tokens -> how the worker builds its draft model (None: no draft model).
ASSISTANTS: Registry[Optional[Callable]] = Registry("model.assistant", valued=True)
# The generation keys an assistant reads (model.assistant=none reads none of them).
DRAFTING = ("generation.num_assistant_tokens", "generation.assistant_schedule")
DRAFT_MODEL = (*DRAFTING, "generation.assistant_confidence_threshold")
ASSISTANTS.register("none", None, None, doc="no assisted generation")
ASSISTANTS.register("tiny", None, build_tiny_draft, doc="a random-init draft built like model=tiny (tests)",
                    check=check_plain_logits, owns=DRAFT_MODEL)
ASSISTANTS.register("prompt_lookup", None, None, doc="n-gram matches in the prompt and generated text (no model)",
                    check=check_plain_logits, owns=(*DRAFTING, "generation.prompt_lookup_ngram"))
ASSISTANTS.register("draft", None, build_draft_model, doc="a draft model folder (model.assistant_path)",
                    check=check_draft_model, owns=DRAFT_MODEL)


def assistant_spec(model_cfg, tokenizer, dtype: torch.dtype, device: torch.device) -> Optional[AssistantSpec]:
    if model_cfg.assistant == "none":
        return None
    build = ASSISTANTS.get(model_cfg.assistant)
    return AssistantSpec(model_cfg.assistant, build(model_cfg, tokenizer, dtype, device) if build else None)
