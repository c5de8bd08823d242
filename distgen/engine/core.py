"""The engine: one step = schedule -> execute (one forward) -> update."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from distgen.engine.assist import Assistant
from distgen.engine.backoff import Backoff, back_off
from distgen.engine.kv.base import ForwardBatch, KVCache
from distgen.engine.queue import RequestQueue
from distgen.engine.request import Completion, Request, RequestFailed, Status
from distgen.engine.runner import Runner
from distgen.engine.sampler import Sampler
from distgen.engine.scheduler import Scheduler, SchedulerState, StepPlan
from distgen.inputs.records import Prompt

# Whether a request's generated tokens hit one of its prompt's stop strings (distgen.engine.stops.StopStrings.hit).
StopCheck = Callable[[Prompt, list[int]], bool]


class Engine:
    def __init__(self, waiting: RequestQueue, scheduler: Scheduler, kv: KVCache, runner: Runner,
                 sampler: Sampler, token_budget: int, stop_check: Optional[StopCheck] = None,
                 assistant: Optional[Assistant] = None, mixed_steps: bool = True):
        self.waiting = waiting  # lazy: requests are made as the scheduler reaches them
        self.stop_check = stop_check
        self.running: list[Request] = []  # requests holding a cache row, in the cache's row order
        self.scheduler, self.kv, self.runner, self.sampler = scheduler, kv, runner, sampler
        self.token_budget = token_budget
        self.assistant = assistant  # set: decode steps are assisted (draft -> verify in one forward -> accept)
        self.mixed_steps = mixed_steps  # generation.mixed_steps (see `mixes`)
        self.last_kind = ""
        self.choice = ""  # which cache/compile the builder chose, and why (printed by the worker)
        self.batch = None  # the batch size and why (memory.BatchChoice), set by the builder
        self.backoff: Optional[Backoff] = None  # out-of-memory back-off (backoff.py); None: errors propagate

    @property
    def mixes(self) -> bool:
        """Whether decoding rows ride along prefill forwards: asked for, and the cache packs both into one
        forward (an assisted decode is a verify forward of its own, so it never mixes)."""
        return self.mixed_steps and self.kv.mixes and self.assistant is None

    @property
    def has_work(self) -> bool:
        self.waiting.settle()  # prompts whose request cannot be made leave as error completions first
        return bool(self.waiting or self.running)

    def step(self) -> list[Completion]:
        """One forward; returns the requests it finished. Out of memory: back off (backoff.py) and return none."""
        if self.backoff is None:
            return self.forward_step()
        try:
            return self.forward_step()
        except torch.OutOfMemoryError as err:
            refusal, error_text = self.backoff.refuse(err), str(err)
            if refusal:
                self.backoff.say(refusal)
                raise
        back_off(self, error_text)  # outside the except block: the traceback's tensors are gone
        return []

    def forward_step(self) -> list[Completion]:
        plan = self.schedule()
        if self.backoff is not None:
            self.backoff.before_forward()
        if plan.kind == "decode" and self.assistant is not None:
            return self.assistant.step(self, plan.requests)
        batch, logits = self.execute(plan)
        return self.update(plan, batch, logits)

    def schedule(self) -> StepPlan:
        self.waiting.settle()
        state = SchedulerState(self.waiting, self.running, self.kv.free_rows, self.token_budget, self.last_kind,
                               mixes=self.mixes)
        plan = self.scheduler(state)
        for request in plan.requests:
            if request.status is Status.WAITING:
                assert self.waiting[0] is request, "schedulers admit queued requests in queue order"
                self.waiting.popleft()
                self.kv.admit(request)
                request.status = Status.PREFILLING
                self.running.append(request)
        self.last_kind = plan.kind
        return plan

    def execute(self, plan: StepPlan) -> tuple[ForwardBatch, torch.Tensor]:
        if plan.kind in ("prefill", "mixed"):  # a mixed step runs as a prefill (eager, never the compiled decode)
            batch = self.kv.prefill_inputs(plan) if plan.kind == "prefill" else self.kv.mixed_inputs(plan)
            return batch, self.runner.prefill(batch.inputs)
        batch = self.kv.decode_inputs(plan.requests)
        return batch, self.runner.decode(batch.inputs)

    def update(self, plan: StepPlan, batch: ForwardBatch, logits: torch.Tensor) -> list[Completion]:
        # 1. sample every logits row on the device; one device->host copy of tokens and EOS flags
        tokens, is_eos = self.sampler(logits, batch.rows, [r.generator for r in plan.requests],
                                      [r.sampling for r in plan.requests])
        host_tokens, host_eos = torch.stack([tokens, is_eos.long()]).tolist()
        # 2. rows whose prompt is now fully cached take their token; finished ones complete
        finished, completions = [], []
        for index, (request, chunk, row) in enumerate(zip(plan.requests, plan.chunks, batch.rows)):
            if plan.prefills(index) and request.prefilled + chunk < request.prompt_length:
                finished.append(False)  # a chunk of a longer prompt: no token yet
                continue
            request.generated.append(host_tokens[row])
            reason = self.finish_reason(request, host_eos[row])
            finished.append(reason is not None)
            if reason:
                completions.append(request.completion(reason))
        # 3. the cache records next inputs and frees finished rows; then request states move on
        self.kv.commit(plan, batch, tokens, finished)
        for index, (request, chunk, done) in enumerate(zip(plan.requests, plan.chunks, finished)):
            if plan.prefills(index):
                request.prefilled += chunk
                if request.prefilled == request.prompt_length:
                    request.status = Status.DECODING
            if done:
                request.status, request.row = Status.FINISHED, -1
        if completions:
            self.running = [r for r in self.running if r.status is not Status.FINISHED]
        return completions

    def finish_reason(self, request: Request, is_eos: bool) -> Optional[str]:
        """After a request took a token: "stop" (a stop string appeared), "eos", "length", "error" (looking
        for its stop strings failed on its tokens: it becomes an error record), or None."""
        try:
            stopped = self.stop_check is not None and self.stop_check(request.prompt, request.generated)
        except RequestFailed as err:
            request.error = str(err)
            return "error"
        if stopped:
            return "stop"
        return "eos" if is_eos else "length" if len(request.generated) >= request.budget else None

    def close(self) -> None:
        """Free the cache (and, on GPU, the allocator's cached blocks) once the rank is done."""
        self.kv.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
