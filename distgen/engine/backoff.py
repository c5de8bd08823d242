"""Out-of-memory back-off: a rank whose step runs out of memory halves its batch and goes on.

On `torch.OutOfMemoryError` (what `torch.cuda.OutOfMemoryError` is) anywhere in a step, the engine
(`Engine.back_off`):
1. drops the KV cache (and, on CUDA, the allocator's cached blocks),
2. puts every request that held a row back at the front of the queue, fresh (no tokens, its sampler
   seeded anew), in the order they had, so they are generated from scratch and give what they would have,
3. builds a cache of half the rows and carries on. Completions returned before are kept; nothing is
   generated twice into the outputs, nothing is lost.

Only where ranks run free (replicate, device_map, zero3 with gather_for_generation). In a lockstep
layout (fsdp, zero3) every forward is a collective: a rank that fails part way through a forward has
skipped collectives its peers are already waiting in, and no later all-reduce can reach them to agree
on a retry. There the error ends the job (the journals keep what finished; rerun with a smaller
generation.batch_size and it resumes).

Test only: DISTGEN_INJECT_OOM_AT_STEP=N raises an injected out-of-memory error in the N-th step
(0-based, counted per rank, once) after the step is scheduled, before its forward.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distgen.engine.kv.base import KVCache

logger = logging.getLogger(__name__)

INJECT_ENV = "DISTGEN_INJECT_OOM_AT_STEP"


def injected_oom_step() -> Optional[int]:
    """The step DISTGEN_INJECT_OOM_AT_STEP names (tests only), or None. Read here and nowhere else."""
    value = os.environ.get(INJECT_ENV, "").strip()
    return int(value) if value else None


@dataclass
class Backoff:
    # False in lockstep layouts: the error is re-raised (see the module docstring).
    enabled: bool
    # rows -> a new, empty cache of that many rows.
    rebuild: Callable[[int], KVCache]
    rows: int
    layout_note: str = ""
    inject_at: Optional[int] = None
    steps: int = 0
    count: int = 0  # back-offs taken

    def before_forward(self) -> None:
        step, self.steps = self.steps, self.steps + 1
        if step == self.inject_at:
            raise torch.OutOfMemoryError(f"out of memory injected by {INJECT_ENV}={step} (a test setting)")

    def refuse(self, error: BaseException) -> Optional[str]:
        """Why this error cannot be backed off from (then it is re-raised), or None."""
        if not self.enabled:
            return (f"out of memory in a lockstep layout{self.layout_note}: back-off is supported only where ranks "
                    f"run free (layout=replicate, device_map); rerun with a smaller generation.batch_size "
                    f"(now {self.rows}) and the job resumes")
        if self.rows <= 1:
            return "out of memory with one row: no smaller batch to back off to"
        return None

    def say(self, text: str) -> None:
        logger.warning(text)

    def shrink(self) -> KVCache:
        """Half the rows (at least one), counted: a new, empty cache of that many rows."""
        self.rows, self.count = max(1, self.rows // 2), self.count + 1
        return self.rebuild(self.rows)

    def say_shrunk(self, error_text: str, requeued: int) -> None:
        self.say(f"{error_text.splitlines()[0] if error_text else 'out of memory'}: backing off to "
                 f"generation.batch_size={self.rows}; {requeued} running sequences requeued from scratch "
                 f"(back-off {self.count})")
