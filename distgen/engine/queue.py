"""The engine's waiting queue, made lazily: a request is built only when a scheduler looks at it.

A prompt becomes one request per sample it still needs (generation.n, less the samples an earlier run finished),
one after the other in the queue, so its samples run side by side and share its prefill (engine.prefix).
Making a request can fail for a reason of its record alone (`RequestFailed`: a seed torch cannot
take, a prompt that could not be tokenized): that prompt becomes an error completion, handed to
`on_failed` (the generation loop sets it; distgen.parallel.loop.run_loop), and the queue goes on.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

from distgen.engine.request import Completion, Request, RequestFailed
from distgen.inputs.records import Prompt

# A prompt's sample indices still to generate (sample_index, 0..n-1).
Samples = Callable[[Prompt], Sequence[int]]


class PromptQueue(Protocol):
    """(prompt, token ids) in decoding order, taken from the front (distgen.parallel.feed.PromptFeed)."""
    def popleft(self) -> tuple[Prompt, Sequence[int]]: ...
    def __len__(self) -> int: ...


class RequestQueue:
    """What the schedulers read as `waiting`: `len`, iteration, `waiting[i]` and `popleft`. Requests are
    made from the prompt queue as they are first looked at, so at most a batch of them exists at a time.
    `len` counts prompts not made yet, some of which may fail; after `settle` it is 0 only when nothing is left.
    `samples`: the sample indices each prompt gets a request for (default: sample 0 only)."""

    def __init__(self, prompts: PromptQueue | Iterable[tuple[Prompt, Sequence[int]]],
                 make: Callable[[Prompt, Sequence[int], int], Request], samples: Optional[Samples] = None):
        self.prompts = prompts if hasattr(prompts, "popleft") else deque(prompts)
        self.make = make
        self.samples = samples or (lambda prompt: (0,))
        self.made: deque[Request] = deque()
        self.unmade: deque[tuple[Prompt, Sequence[int], int]] = deque()  # the front prompt's samples not made yet
        # Where a prompt whose request cannot be made goes, as an error completion; None: the failure propagates.
        self.on_failed: Optional[Callable[[Completion], None]] = None

    def __len__(self) -> int:
        return len(self.made) + len(self.unmade) + len(self.prompts)

    def __bool__(self) -> bool:
        return len(self) > 0

    def take(self, prompt: Prompt, ids: Sequence[int], sample: int = 0) -> Optional[Request]:
        """The request of the prompt's sample, or None when its record fails it (handed to `on_failed`)."""
        try:
            return self.make(prompt, ids, sample)
        except RequestFailed as err:
            if self.on_failed is None:
                raise
            self.on_failed(Completion(prompt, len(ids), [], "error", str(err), sample))
            return None

    def fill(self, count: int) -> None:
        """Make requests until `count` exist or no prompt is left."""
        while len(self.made) < count and (self.unmade or len(self.prompts)):
            if not self.unmade:
                prompt, ids = self.prompts.popleft()
                self.unmade.extend((prompt, ids, sample) for sample in self.samples(prompt))
                continue
            request = self.take(*self.unmade.popleft())
            if request is not None:
                self.made.append(request)

    def settle(self) -> None:
        """The front is a made request, or the queue is empty (so `bool(queue)` says whether a request is left)."""
        self.fill(1)

    def __iter__(self) -> Iterator[Request]:
        """The requests in order, each made when the iteration reaches it (stop early to make no more)."""
        i = 0
        while True:
            self.fill(i + 1)
            if i >= len(self.made):
                return
            yield self.made[i]
            i += 1

    def __getitem__(self, i: int) -> Request:
        self.fill(i + 1)
        return self.made[i]

    def popleft(self) -> Request:
        self.fill(1)
        return self.made.popleft()

    def requeue(self, requests: list[Request]) -> None:
        """Put these requests back at the front, in this order, made afresh (no tokens, a new sampler)."""
        remade = (self.take(r.prompt, r.token_ids, r.sample) for r in requests)
        self.made.extendleft(reversed([r for r in remade if r is not None]))


class AdapterRun:
    """The front of the waiting queue whose requests run with one LoRA adapter (their records' `lora`, None: the
    base model): what a step may admit while that adapter is active (Engine.admissible). Iteration stops at the
    first request of another adapter; a scheduler reads it as it reads the queue (truth, iteration)."""

    def __init__(self, queue: RequestQueue, adapter: Optional[str]):
        self.queue, self.adapter = queue, adapter

    def __bool__(self) -> bool:
        return bool(self.queue) and self.queue[0].prompt.lora == self.adapter

    def __iter__(self) -> Iterator[Request]:
        for request in self.queue:
            if request.prompt.lora != self.adapter:
                return
            yield request
