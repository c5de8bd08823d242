"""The engine's waiting queue, made lazily: a request is built only when a scheduler looks at it."""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Protocol, Sequence

from distgen.engine.request import Request
from distgen.inputs.records import Prompt


class PromptQueue(Protocol):
    """(prompt, token ids) in decoding order, taken from the front (distgen.parallel.feed.PromptFeed)."""
    def popleft(self) -> tuple[Prompt, Sequence[int]]: ...
    def __len__(self) -> int: ...


class RequestQueue:
    """What the schedulers read as `waiting`: `len`, `waiting[i]` and `popleft`. Requests are made
    from the prompt queue as they are first looked at, so at most a batch of them exists at a time."""

    def __init__(self, prompts: PromptQueue | Iterable[tuple[Prompt, Sequence[int]]],
                 make: Callable[[Prompt, Sequence[int]], Request]):
        self.prompts = prompts if hasattr(prompts, "popleft") else deque(prompts)
        self.make = make
        self.made: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self.made) + len(self.prompts)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, i: int) -> Request:
        while len(self.made) <= i:
            self.made.append(self.make(*self.prompts.popleft()))
        return self.made[i]

    def popleft(self) -> Request:
        self[0]
        return self.made.popleft()

    def requeue(self, requests: list[Request]) -> None:
        """Put these requests back at the front, in this order, made afresh (no tokens, a new sampler)."""
        self.made.extendleft(reversed([self.make(r.prompt, r.token_ids) for r in requests]))
