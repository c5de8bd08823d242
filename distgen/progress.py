"""Periodic per-rank progress lines for long jobs."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class ProgressLog:
    def __init__(self, rank: int, total_prompts: int, every_s: float,
                 clock: Callable[[], float] = time.monotonic, out: TextIO = sys.stderr):
        self.rank, self.total, self.every_s, self.clock, self.out = rank, total_prompts, every_s, clock, out
        self.start = self.last = clock()
        self.prompts = self.tokens = 0

    def finished(self, prompts: int, tokens: int) -> None:
        self.prompts += prompts
        self.tokens += tokens
        now = self.clock()
        if self.every_s > 0 and now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.start
            print(f"distgen: rank {self.rank}: {self.prompts}/{self.total} prompts, {self.tokens} tokens, "
                  f"{elapsed:.0f}s, {self.tokens / elapsed:.1f} tok/s", file=self.out, flush=True)
