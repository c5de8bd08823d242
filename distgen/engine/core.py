"""The engine: one step = schedule -> launch (one forward, its tokens sampled on the device) -> land (read the
tokens, finish requests).

The engine is built from its plan (plan.py: every decision the builder made, with its reason) and the parts the
builder made for it; its state changes only through its own methods (a step, an out-of-memory back-off).

Where the cache addresses rows by slot id and nothing runs in lockstep (`EnginePlan.pipelined`), a step lands the
PREVIOUS step's tokens after launching its own forward: the forward of step N+1 is built from device state
before the host reads step N's tokens (one read per step, `host.read`, through pinned memory), so the device
never waits for the host's bookkeeping. A request that finished at step N (EOS, a stop string) is seen one step
late: its token from step N+1 is dropped, so outputs are the same. Budgets are known on the host, so a request
whose every token is launched is not scheduled again (`Request.saturated`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from distgen.engine.assist import Assistant
from distgen.engine.backoff import Backoff
from distgen.engine.grammar import GrammarBook
from distgen.engine.graphs import DecodeRunner
from distgen.engine.host import READS, Pending, read
from distgen.engine.kv.base import ForwardBatch, KVCache
from distgen.engine.memory import BatchChoice
from distgen.engine.plan import EnginePlan
from distgen.engine.prefix import PrefixIndex
from distgen.engine import prompt_logprobs
from distgen.engine.queue import AdapterRun, RequestQueue
from distgen.engine.request import Completion, Request, RequestFailed, Status
from distgen.engine.runner import Runner
from distgen.engine.sampler import Sampled, Sampler
from distgen.engine.scheduler import Scheduler, SchedulerState, StepPlan
from distgen.inputs.records import Prompt

# Whether a request's generated tokens hit one of its prompt's stop strings (distgen.engine.stops.StopStrings.hit).
StopCheck = Callable[[Prompt, list[int]], bool]


class Adapters(Protocol):
    """LoRA adapters swapped into the model's weights between requests (distgen.models.lora.AdapterBank)."""
    names: tuple[str, ...]  # every adapter a request may name
    active: Optional[str]   # the adapter the weights hold now (None: the base model)

    def activate(self, name: Optional[str]) -> None: ...


@dataclass
class Launched:
    """A step whose forward is launched: its tokens on the device and on their way to the host."""
    plan: StepPlan
    batch: ForwardBatch
    sampled: Sampled      # tokens (logits rows,) on the device, EOS flags, the logprobs of the rows that ask
    host: Pending         # what the host reads of them (Sampled.for_host)
    takes: list[bool]     # per planned request: whether it takes a token from this step (not a mid-prompt chunk)


class Engine:
    def __init__(self, plan: EnginePlan, waiting: RequestQueue, scheduler: Scheduler, kv: KVCache, runner: Runner,
                 sampler: Sampler, stop_check: Optional[StopCheck] = None, assistant: Optional[Assistant] = None,
                 prefixes: Optional[PrefixIndex] = None, decoder: Optional[DecodeRunner] = None,
                 backoff: Optional[Backoff] = None, adapters: Optional[Adapters] = None,
                 grammars: Optional[GrammarBook] = None):
        self.plan = plan  # every decision behind this engine, with its reason (plan.py)
        # The parts
        self.waiting = waiting  # lazy: requests are made as the scheduler reaches them
        self.scheduler, self.kv, self.runner, self.sampler = scheduler, kv, runner, sampler
        self.stop_check = stop_check
        self.assistant = assistant  # set: decode steps are assisted (draft -> verify in one forward -> accept)
        # Shared prefixes (prefix.py): prompts' samples and prompts of one prefix copy the KV a slot holds; None where
        # the cache does not copy between rows (every request prefills its whole prompt).
        self.prefixes = prefixes
        # Decode steps over rows addressed by slot id, padded to buckets, replayed as CUDA graphs where they can be
        # (graphs.py); None: decode through kv.decode_inputs.
        self.decoder = decoder
        self.backoff = backoff  # out-of-memory back-off (backoff.py); None: errors propagate
        # LoRA adapters chosen per request (model.lora by name); None: the weights never change. Requests come
        # grouped by adapter (distgen.parallel.plan.decode_order); see `admissible`.
        self.adapters = adapters
        # Structured output's compiled grammars (grammar.py GrammarBook); requests with a grammar hold a matcher,
        # whose next mask needs every token launched before (`land_constrained`).
        self.grammars = grammars
        # The state
        self.running: list[Request] = []  # requests holding a cache row, in the cache's row order
        self.constrained = False  # whether a running request follows a grammar (kept as `running` changes)
        self.last_kind = ""
        self.inflight: Optional[Launched] = None  # the launched step not landed yet (a pipelined engine)
        self.forwards = 0  # forwards launched
        self.prefill_tokens = 0  # prompt tokens run through forwards (what prefix sharing saves is not among them)
        self.prefill_seconds = 0.0  # wall seconds of launching the steps that carry prompt tokens
        self.reads_at_start = READS.count

    @property
    def choice(self) -> str:
        """The engine line: which batch, cache, compile ... the builder chose, and why (printed by the worker)."""
        return self.plan.describe()

    @property
    def batch(self) -> BatchChoice:
        """The batch size the engine started with, and why."""
        return self.plan.batch

    @property
    def pipelined(self) -> bool:
        """Launch step N+1 before landing step N (the cache addresses rows by slot id, the layout is not lockstep
        and no assistant runs)."""
        return self.plan.pipelined

    @property
    def mixes(self) -> bool:
        """Whether decoding rows ride along prefill forwards: asked for, and the cache packs both into one
        forward (an assisted decode is a verify forward of its own, so it never mixes)."""
        return self.plan.mixed

    def on_failed(self, report: Callable[[Completion], None]) -> None:
        """A prompt whose request cannot be made (distgen.engine.queue) is finished as an error completion, handed
        to `report`."""
        self.waiting.on_failed = report

    @property
    def has_work(self) -> bool:
        self.waiting.settle()  # prompts whose request cannot be made leave as error completions first
        return bool(self.waiting or self.running or self.inflight)

    @property
    def host_reads(self) -> int:
        """Device->host reads of values since the engine was built (host.read)."""
        return READS.count - self.reads_at_start

    def step(self) -> list[Completion]:
        """One forward; returns the requests it finished. Out of memory: back off (backoff.py) and return only those a
        constrained step landed before it (`land_constrained`)."""
        if self.backoff is None:
            return self.land_constrained() + self.forward_step()
        # A step landed before this one is scheduled (a grammar's) finished its requests: they are not running any
        # more, so a back-off would not requeue them; they are returned whatever happens next.
        landed: list[Completion] = []
        try:
            landed = self.land_constrained()
            return landed + self.forward_step()
        except torch.OutOfMemoryError as err:
            refusal, error_text = self.backoff.refuse(err), str(err)
            if refusal:
                self.backoff.say(refusal)
                raise
        self.back_off(error_text)  # outside the except block: the traceback's tensors are gone
        return landed

    def back_off(self, error_text: str) -> None:
        """Halve the batch after running out of memory (backoff.py): free the cache, requeue the running requests
        from scratch (their launched step's tokens dropped, their token history with them), rebuild."""
        requests, self.running, self.inflight, self.constrained = self.running, [], None, False
        self.sampler.release(requests)
        self.kv.close()
        self.kv = None
        if self.prefixes is not None:  # no slot holds a prefix any more
            self.prefixes.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.waiting.requeue(requests)
        self.kv, self.last_kind = self.backoff.shrink(), ""
        self.backoff.say_shrunk(error_text, len(requests))

    def forward_step(self) -> list[Completion]:
        """Schedule, launch and land one step (`step` has landed a constrained step before: `land_constrained`)."""
        plan = self.schedule()
        if not plan.requests:  # every running request's tokens are launched: land the last step only
            landing, self.inflight = self.inflight, None
            return self.land(landing) if landing else []
        if self.backoff is not None:
            self.backoff.before_forward()
        if plan.kind == "decode" and self.assistant is not None:
            self.forwards += 1
            completions = self.assistant.step(self.kv, self.runner, self.finish_reason, plan.requests)
            self.drop_finished()
            return completions
        started = time.perf_counter()
        launched = self.launch(plan)
        if plan.kind != "decode":
            self.prefill_seconds += time.perf_counter() - started
        if not self.pipelined:
            return self.land(launched)
        landing, self.inflight = self.inflight, launched
        return self.land(landing) if landing else []

    def land_constrained(self) -> list[Completion]:
        """Where a running request follows a grammar, the launched step lands before the next is scheduled: its
        next mask is its matcher's, which must have taken every token it was launched with (a pipelined step
        would run a constrained row one token ahead of its matcher). Such steps are not pipelined; the others are."""
        if self.inflight is None or not self.constrained:
            return []
        landing, self.inflight = self.inflight, None
        return self.land(landing)

    def admissible(self) -> RequestQueue | AdapterRun | tuple:
        """The waiting requests the next step may admit. With adapters, those of the active one: the weights
        hold one adapter at a time, so the next one is swapped in only once no row of the last one runs (none
        running, none in flight); until then the rows still running finish while no request joins."""
        if self.adapters is None or not self.waiting:
            return self.waiting
        wanted = self.waiting[0].prompt.lora
        if wanted != self.adapters.active:
            if self.running or self.inflight is not None:
                return ()
            self.adapters.activate(wanted)
        return AdapterRun(self.waiting, wanted)

    def schedule(self) -> StepPlan:
        self.waiting.settle()
        running = [r for r in self.running if not r.saturated]
        waiting = self.admissible()
        free = self.kv.free_rows
        if self.prefixes is not None and free:  # the front requests' shared prefixes; one that should wait stops them
            free = self.prefixes.admissible(waiting, free, self.kv)
        state = SchedulerState(waiting, running, free, self.plan.token_budget, self.last_kind, mixes=self.mixes)
        plan = self.scheduler(state)
        if not plan.requests:
            return plan
        admitted = [r for r in plan.requests if r.status is Status.WAITING]
        for request in admitted:
            assert self.waiting[0] is request, "schedulers admit queued requests in queue order"
            self.waiting.popleft()
        if self.prefixes is None:
            for request in admitted:
                self.kv.admit(request)
        else:
            self.prefixes.admit(self.kv, admitted)  # slots, and the shared columns copied into them
        for request in admitted:
            request.status = Status.PREFILLING
            self.running.append(request)
            self.constrained = self.constrained or request.matcher is not None
        self.last_kind = plan.kind
        return plan

    def execute(self, plan: StepPlan) -> tuple[ForwardBatch, torch.Tensor]:
        if plan.kind in ("prefill", "mixed"):  # a mixed step runs as a prefill (eager, never the compiled decode)
            batch = self.kv.prefill_inputs(plan) if plan.kind == "prefill" else self.kv.mixed_inputs(plan)
            asking = prompt_logprobs.asking(plan)
            if asking:  # the forward keeps their prompt positions' logits too, reduced to blocks right away
                device = batch.inputs["input_ids"].device
                inputs, widened = prompt_logprobs.widen(batch.inputs, plan, batch.decode_slots, asking, device)
                logits = prompt_logprobs.split(self.runner.prefill_kept(inputs), widened, batch.rows)
                return batch, logits
            return batch, self.runner.prefill(batch.inputs)
        batch = self.kv.decode_inputs(plan.requests)
        return batch, self.runner.decode(batch.inputs)

    def launch(self, plan: StepPlan) -> Launched:
        """Run the plan's forward and sample its tokens, all on the device; move the host's bookkeeping on (what
        the next step's schedule reads) without looking at the tokens."""
        # Only rows that take a token draw (their noise is keyed by completion position), so a sampled record's draws
        # do not depend on how it was chunked. Each row's settings are looked up once for the step.
        takes = taking_tokens(plan)
        taking = plan.requests if all(takes) else [r if take else None for r, take in zip(plan.requests, takes)]
        settings = self.sampler.row_settings(taking)
        if plan.kind == "decode" and self.decoder is not None:
            # 1. the padded (graph-replayed) step: greedy tokens and the cache's next inputs, on the device; rows
            # that sample or take the logits path choose from the step's logits and replace their greedy next input
            out = self.decoder.run(self.kv, plan.requests)
            batch, sampled = out.batch, Sampled(out.tokens, out.is_eos)
            if self.sampler.needed(settings):
                sampled = self.sampler(out.logits, batch.rows, taking, settings)
                self.kv.last_tokens[batch.decode_rows] = sampled.tokens
        else:
            batch, logits = self.execute(plan)
            # 1. choose every logits row's token on the device; the cache's device state takes the tokens (next inputs)
            sampled = self.sampler(logits, batch.rows, taking, settings)
            self.kv.advance_state(plan, batch, sampled.tokens)
        host = Pending(sampled.for_host())  # to pinned memory, not waited for here
        # 2. prompts move on; rows whose prompt is now fully cached take a token from this step
        self.move_on(plan, takes)
        self.forwards += 1
        return Launched(plan, batch, sampled, host, takes)

    def move_on(self, plan: StepPlan, takes: list[bool]) -> None:
        """After a launch: prefilling rows' prompts move on by their chunks (a row whose prompt is now cached
        starts decoding); each row that takes a token has one more in flight."""
        if plan.kind == "decode":  # no prompt moves, every row takes a token
            for request in plan.requests:
                request.inflight += 1
            return
        for index, (request, chunk, take) in enumerate(zip(plan.requests, plan.chunks, takes)):
            if plan.prefills(index):
                self.prefill_tokens += chunk
                request.prefilled += chunk
                if request.prefilled == request.prompt_length:
                    request.status = Status.DECODING
            request.inflight += take

    def land(self, launched: Launched) -> list[Completion]:
        """Read a launched step's tokens (the step's one host read); requests take them and finish."""
        plan, batch = launched.plan, launched.batch
        host_tokens, host_eos, logprobs = launched.sampled.unpack(read(launched.host))
        # 1. each request takes its token (a mid-prompt chunk takes none; one finished a step ago drops its extra)
        finished, completions = [False] * len(plan.requests), []
        for index, (request, row, take) in enumerate(zip(plan.requests, batch.rows, launched.takes)):
            if not take or request.status is Status.FINISHED:
                continue
            request.inflight -= 1
            request.generated.append(host_tokens[row])
            if request.logprobs is not None:
                request.logprobs.append(logprobs[row])
            reason = self.finish_reason(request, host_eos[row])
            if reason:
                finished[index] = True
                completions.append(request.completion(reason, prompt_logprobs.entries(request)))
        # 2. the cache frees finished rows (and whatever else it does with them), the sampler their token history;
        # they leave the running list
        self.kv.commit(plan, batch, launched.sampled.tokens, finished)
        for request, done in zip(plan.requests, finished):
            if done:
                if self.prefixes is not None:  # its freed slot still holds its prompt's columns
                    self.prefixes.retire(request, request.row)
                request.status, request.row = Status.FINISHED, -1
                self.sampler.release([request])
        if completions:
            self.drop_finished()
        return completions

    def drop_finished(self) -> None:
        """Finished requests leave the running list."""
        self.running = [r for r in self.running if r.status is not Status.FINISHED]
        self.constrained = any(r.matcher is not None for r in self.running)

    def finish_reason(self, request: Request, is_eos: bool) -> Optional[str]:
        """After a request took a token: "stop" (its grammar ended), "stop" (a stop string appeared), "eos" (unless
        its settings ignore EOS), "stop" (one of its stop_token_ids), "length", "error" (its grammar refused the token,
        or looking for its stop strings failed on its tokens: it becomes an error record), or None."""
        if request.matcher is not None or self.stop_check is not None:
            reason = self.stopped(request)
            if reason:
                return reason
        settings = request.sampling or self.sampler.default  # run once per row per step: Sampler.settings inlined
        if is_eos and not settings.ignore_eos:
            return "eos"
        if settings.stop_token_ids and request.generated[-1] in settings.stop_token_ids:
            return "stop"
        return "length" if len(request.generated) >= request.budget else None

    def stopped(self, request: Request) -> Optional[str]:
        """After a request took a token: "stop" (its grammar ended, or a stop string appeared), "error" (its grammar
        refused the token, or looking for its stop strings failed), or None."""
        if request.matcher is not None:
            if not request.matcher.accept_token(request.generated[-1]):
                request.error = (f"its {request.sampling.grammar.kind} refused token {request.generated[-1]} (no token "
                                 "its grammar allows was left to choose)")
                return "error"
            if request.matcher.is_terminated():
                return "stop"
        try:
            stopped = self.stop_check is not None and self.stop_check(request.prompt, request.generated)
        except RequestFailed as err:
            request.error = str(err)
            return "error"
        return "stop" if stopped else None

    def close(self) -> None:
        """Free the cache (and, on GPU, the allocator's cached blocks) once the rank is done."""
        self.kv.close()
        self.sampler.close()
        if self.decoder is not None:
            self.decoder.kv, self.decoder.graphs = None, {}  # the graphs' memory pool goes with them
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def taking_tokens(plan: StepPlan) -> list[bool]:
    """Per planned request, whether it takes a token from this step: a decoding row does; a prefilling row unless
    it runs a chunk short of its prompt's end."""
    if plan.kind == "decode":
        return [True] * len(plan.requests)
    return [not plan.prefills(index) or request.prefilled + chunk == request.prompt_length
            for index, (request, chunk) in enumerate(zip(plan.requests, plan.chunks))]
