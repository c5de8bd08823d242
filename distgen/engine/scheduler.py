"""Schedulers: which requests run in the next forward, and how many prompt tokens each.

A scheduler reads the engine's queue and running rows and returns a `StepPlan`: a prefill
(requests and the prompt tokens each runs now), a decode of every running row, or, where the cache
packs both into one forward (`SchedulerState.mixes`), a mixed step: the decoding rows' next tokens and
prompt tokens together, so that admitting a prompt does not pause the rows already decoding (what
vLLM's scheduler does; on a GPU a forward's cost is mostly fixed, so it saves a forward per admission).
Policies are picked by name (`generation.scheduler`) from the `SCHEDULERS` name table, which the
config check, `--help` and the engine builder all read.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable

from distgen.engine.queue import RequestQueue
from distgen.engine.request import Request, Status
from distgen.common.registry import Registry


@dataclass(frozen=True)
class StepPlan:
    # "prefill": run `chunks[i]` more prompt tokens of `requests[i]`; "decode": one token for each request;
    # "mixed": the first `decodes` requests decode one token, the rest run prompt chunks.
    kind: str
    requests: list[Request]
    chunks: list[int]
    decodes: int = 0

    def prefills(self, index: int) -> bool:
        """Whether requests[index] runs prompt tokens in this step (else it decodes one token)."""
        return self.kind == "prefill" or (self.kind == "mixed" and index >= self.decodes)

    def part(self, kind: str) -> "StepPlan":
        """A mixed step's decode or prefill part, as a plan of its own."""
        cut = slice(None, self.decodes) if kind == "decode" else slice(self.decodes, None)
        return StepPlan(kind, self.requests[cut], self.chunks[cut])


@dataclass(frozen=True)
class SchedulerState:
    waiting: RequestQueue   # len, iteration and popleft; requests are made as they are looked at
    running: list[Request]  # requests holding a cache row (prefilling or decoding)
    free_rows: int
    # Most prompt tokens one prefill forward runs: chunked splits prompts to fit it; static and continuous
    # admit whole prompts while they fit (always at least one), so a packed prefill stays bounded.
    token_budget: int
    last_kind: str          # what the previous step did ("prefill", "decode", "mixed" or "")
    # The cache runs decode and prompt tokens in one forward (the varlen slot cache) and the step may
    # mix them (generation.mixed_steps, no assistant): continuous and chunked then emit mixed steps.
    mixes: bool = False


Scheduler = Callable[[SchedulerState], StepPlan]


def decoding_rows(state: SchedulerState) -> list[Request]:
    """The running requests whose whole prompt is cached (those still prefilling a chunk are not)."""
    return [r for r in state.running if r.status is Status.DECODING]


def decode_plan(state: SchedulerState) -> StepPlan:
    return StepPlan("decode", list(state.running), [1] * len(state.running))


def whole_prompts(state: SchedulerState) -> StepPlan:
    """Queued prompts, whole, while rows are free and their tokens fit the token budget (at least one)."""
    joining, left = [], state.token_budget
    for request in islice(state.waiting, state.free_rows):
        if joining and request.unprefilled > left:
            break
        joining.append(request)
        left -= request.unprefilled
    return StepPlan("prefill", joining, [r.unprefilled for r in joining])


def schedule_static(state: SchedulerState) -> StepPlan:
    """Static batches: a new batch is prefilled only once every row of the last one is done (a batch
    whose prompts exceed the token budget is admitted over consecutive prefill steps)."""
    admitting = state.last_kind == "prefill" and state.free_rows and state.waiting
    if state.running and not admitting:
        return decode_plan(state)
    return whole_prompts(state)


def mixed(decoding: list[Request], prefill: StepPlan) -> StepPlan:
    """The decoding rows' next tokens and `prefill`'s prompt tokens in one step (a prefill alone without them)."""
    if not decoding:
        return prefill
    return StepPlan("mixed", decoding + prefill.requests, [1] * len(decoding) + prefill.chunks, len(decoding))


def schedule_continuous(state: SchedulerState) -> StepPlan:
    """Continuous batching: queued prompts join (whole) as soon as a row is free; where the cache
    mixes, the running rows decode in the same forward."""
    if state.waiting and state.free_rows:
        prefill = whole_prompts(state)
        return mixed(decoding_rows(state), prefill) if state.mixes else prefill
    return decode_plan(state)


def schedule_chunked(state: SchedulerState) -> StepPlan:
    """Chunked prefill: at most `token_budget` prompt tokens per forward, alternating with decode steps.

    Rows still prefilling go first, then queued prompts while rows are free; a long prompt
    takes several prefill steps, and the decoding rows advance one token between them (where the
    cache mixes: in the same forward as each chunk, which then takes the budget less their tokens, at
    least half of it).
    """
    decoding = decoding_rows(state)
    if decoding and state.last_kind == "prefill" and not state.mixes:
        return StepPlan("decode", decoding, [1] * len(decoding))
    candidates = [r for r in state.running if r.status is Status.PREFILLING]
    candidates += islice(state.waiting, state.free_rows)
    # Mixed: the decode tokens take their share of the budget first, but prompts keep at least half of it.
    left = max(state.token_budget - len(decoding), (state.token_budget + 1) // 2) if state.mixes else state.token_budget
    requests, chunks = [], []
    for request in candidates:
        if left <= 0:
            break
        take = min(request.unprefilled, left)
        requests.append(request)
        chunks.append(take)
        left -= take
    if not requests:
        return StepPlan("decode", decoding, [1] * len(decoding))
    prefill = StepPlan("prefill", requests, chunks)
    return mixed(decoding, prefill) if state.mixes else prefill


SCHEDULERS: Registry[Scheduler] = Registry("generation.scheduler", valued=True)
SCHEDULERS.register("static", None, schedule_static)
SCHEDULERS.register("continuous", None, schedule_continuous)
SCHEDULERS.register("chunked", None, schedule_chunked)
