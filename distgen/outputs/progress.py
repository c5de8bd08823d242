"""Progress of the whole job, shown once, on rank 0, with no collectives added.

Each rank's `RankSampler` thread samples its memory and counters every
output.sample_every_s (the report's timeline) and writes its latest sample to a small file in
the side channel folder, output.dir/.distgen/progress/. Rank 0's sampler also reads every
rank's file and shows the sums: a tqdm bar when stderr is a terminal (and info lines are shown), otherwise an
info line every output.progress_every_s.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, TextIO

from distgen.common.files import write_atomic
from distgen.outputs.stats import current_rss_mib, cuda_allocated_mib

logger = logging.getLogger(__name__)

# Beyond this many samples a rank keeps every other one and samples half as often.
MAX_SAMPLES = 1000


@dataclass
class LiveCounters:
    """Updated by the rank's loop as completions finish; read by its sampler thread."""
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    sampled: int = 0  # completions whose tokens were drawn (temperature > 0), not chosen greedily


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the rank started generating
    rss_mib: float
    cuda_mib: float
    prompts: int
    generated_tokens: int
    forward_steps: int
    idle_steps: int


def write_json_atomic(path: Path, obj) -> None:
    """A progress sample: written every second, so not synced to disk (a lost one is replaced by the next)."""
    write_atomic(path, json.dumps(obj), fsync=False)


def read_channel(folder: Path) -> list[dict]:
    found = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(prompts: int, total: int, tokens: int, elapsed: float, unit: str = "prompts") -> str:
    rate = tokens / elapsed if elapsed > 0 else 0.0
    eta = format_eta(elapsed * (total - prompts) / prompts) if 0 < prompts < total else "-"
    percent = 100.0 * prompts / total if total else 100.0
    return (f"{prompts}/{total} {unit} ({percent:.1f}%), {tokens} tokens generated, {rate:.1f} generated "
            f"tok/s (wall), {elapsed:.0f}s elapsed, ETA {eta}")


class ProgressDisplay:
    """Rank 0's view of all ranks: a tqdm bar on a terminal (`out`, stderr), else a line to `say` (an info line)
    every `every_s`. Where info lines are not shown (--quiet), neither is the bar."""

    def __init__(self, total_prompts: int, every_s: float, out: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic, terminal: Optional[bool] = None,
                 say: Callable[[str], None] = logger.info, unit: str = "prompt"):
        """`total_prompts` counts `unit`s: prompts, or records where a prompt has several samples (n)."""
        self.total, self.every_s, self.clock, self.say, self.unit = total_prompts, every_s, clock, say, unit
        self.start = self.last_line = clock()
        self.bar = None
        out = sys.stderr if out is None else out  # looked up now: a redirect (or pytest's capture) since import
        if (out.isatty() if terminal is None else terminal) and logger.isEnabledFor(logging.INFO):
            from tqdm import tqdm
            self.bar = tqdm(total=total_prompts, unit=unit, file=out, dynamic_ncols=True, desc="distgen")

    def update(self, prompts: int, tokens: int, final: bool = False) -> None:
        elapsed = self.clock() - self.start
        if self.bar is not None:
            self.bar.n = prompts
            self.bar.set_postfix_str(f"{tokens} tok, {tokens / elapsed if elapsed > 0 else 0:.1f} gen tok/s (wall)",
                                     refresh=True)
            if final:
                self.bar.close()
        elif self.every_s > 0 and (final or self.clock() - self.last_line >= self.every_s):
            self.last_line = self.clock()
            self.say(progress_line(prompts, self.total, tokens, elapsed, self.unit + "s"))


class RankSampler:
    """A daemon thread: samples this rank every `every_s`, publishes the sample to the side
    channel, and (with a display, on rank 0) shows every rank's sum."""

    def __init__(self, rank: int, every_s: float, channel: Path, live: LiveCounters, loop_counters,
                 device, display: Optional[ProgressDisplay] = None):
        self.rank, self.every_s, self.channel, self.live, self.loop = rank, every_s, channel, live, loop_counters
        self.device, self.display = device, display
        self.samples: list[Sample] = []
        self.start = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"distgen-sampler-{rank}", daemon=True)
        channel.mkdir(parents=True, exist_ok=True)

    def sample(self) -> Sample:
        sample = Sample(round(time.monotonic() - self.start, 3), round(current_rss_mib(), 1),
                        round(cuda_allocated_mib(self.device), 1), self.live.prompts, self.live.generated_tokens,
                        self.loop.forward_steps, self.loop.idle_steps)
        self.samples.append(sample)
        if len(self.samples) > MAX_SAMPLES:
            self.samples = self.samples[::2]
            self.every_s *= 2
        try:
            write_json_atomic(self.channel / f"rank-{self.rank:05d}.json", asdict(sample))
        except OSError:  # a side channel only: a full disk is reported by the shard writer
            pass
        return sample

    def show(self, final: bool = False) -> None:
        if self.display is not None:
            ranks = read_channel(self.channel)
            self.display.update(sum(r["prompts"] for r in ranks), sum(r["generated_tokens"] for r in ranks), final)

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.sample()
            self.show()

    def __enter__(self) -> "RankSampler":
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.sample()
