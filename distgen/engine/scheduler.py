"""Schedulers: which requests run in the next forward, and how many prompt tokens each.

A scheduler reads the engine's queue and running rows and returns a `StepPlan`: either a
prefill (requests and the prompt tokens each runs now) or a decode of every running row.
Policies are picked by name (`generation.scheduler`) from the `SCHEDULERS` name table, which the
config check, `--help` and the engine builder all read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from distgen.engine.queue import RequestQueue
from distgen.engine.request import Request, Status
from distgen.registry import Registry


@dataclass(frozen=True)
class StepPlan:
    # "prefill": run `chunks[i]` more prompt tokens of `requests[i]`; "decode": one token for each request.
    kind: str
    requests: list[Request]
    chunks: list[int]


@dataclass(frozen=True)
class SchedulerState:
    waiting: RequestQueue   # len, waiting[i] and popleft; requests are made as they are looked at
    running: list[Request]  # requests holding a cache row (prefilling or decoding)
    free_rows: int
    # Most prompt tokens one prefill forward runs: chunked splits prompts to fit it; static and continuous
    # admit whole prompts while they fit (always at least one), so a packed prefill stays bounded.
    token_budget: int
    last_kind: str          # what the previous step did ("prefill", "decode" or "")


Scheduler = Callable[[SchedulerState], StepPlan]


def decode_plan(state: SchedulerState) -> StepPlan:
    return StepPlan("decode", list(state.running), [1] * len(state.running))


def whole_prompts(state: SchedulerState) -> StepPlan:
    """Queued prompts, whole, while rows are free and their tokens fit the token budget (at least one)."""
    joining, left = [], state.token_budget
    for i in range(min(state.free_rows, len(state.waiting))):
        request = state.waiting[i]
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


def schedule_continuous(state: SchedulerState) -> StepPlan:
    """Continuous batching: queued prompts join (whole) as soon as a row is free."""
    if state.waiting and state.free_rows:
        return whole_prompts(state)
    return decode_plan(state)


def schedule_chunked(state: SchedulerState) -> StepPlan:
    """Chunked prefill: at most `token_budget` prompt tokens per forward, alternating with decode steps.

    Rows still prefilling go first, then queued prompts while rows are free; a long prompt
    takes several prefill steps, and the decoding rows advance one token between them.
    """
    decoding = [r for r in state.running if r.status is Status.DECODING]
    if decoding and state.last_kind == "prefill":
        return StepPlan("decode", decoding, [1] * len(decoding))
    candidates = [r for r in state.running if r.status is Status.PREFILLING]
    candidates += [state.waiting[i] for i in range(min(state.free_rows, len(state.waiting)))]
    requests, chunks, left = [], [], state.token_budget
    for request in candidates:
        if left <= 0:
            break
        take = min(request.unprefilled, left)
        requests.append(request)
        chunks.append(take)
        left -= take
    if not requests:
        return StepPlan("decode", decoding, [1] * len(decoding))
    return StepPlan("prefill", requests, chunks)


SCHEDULERS: Registry[Scheduler] = Registry("generation.scheduler", valued=True)
SCHEDULERS.register("static", None, schedule_static)
SCHEDULERS.register("continuous", None, schedule_continuous)
SCHEDULERS.register("chunked", None, schedule_chunked)
