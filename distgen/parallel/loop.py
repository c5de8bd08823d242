"""The synced generation loop every rank runs over its own prompts.

In a lockstep layout every forward is a collective (FSDP all-gathers each block's weights),
so before each step the ranks all-reduce whether any of them still has work. A rank with
nothing left keeps joining forwards with a one-token dummy input until all are done, then
every rank leaves on the same step. Other layouts skip the all-reduce and run freely.

The all-reduce runs on the layout's group (the ranks that shard one copy), never on all ranks
while another group generates on its own. With `sync_every=k` it runs every k-th step: every
rank still makes exactly one forward (real or dummy) per step, so the group stays in step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from distgen.engine import Completion, Engine
from distgen.engine.host import read
from distgen.parallel.feed import say_failed


@dataclass
class LoopCounters:
    forward_steps: int = 0
    idle_steps: int = 0
    seconds: float = 0.0


def any_rank_has_work(has_work: bool, device: torch.device, group=None) -> bool:
    flag = torch.tensor([1 if has_work else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(read(flag)[0])  # a counted read (engine.host): the lockstep agreement's own sync


def idle_forward(model: torch.nn.Module, pad_id: int, device: torch.device) -> None:
    """A forward that exists only so that this rank's share of the collectives happens."""
    model(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)


def said_failed(completion: Completion) -> Completion:
    """A record the engine could not make a request of (a grammar that does not compile, a logit_bias token past
    the vocabulary, ...) is said as screening's are (parallel/feed.py say_failed); one read with an error already
    was said then."""
    if completion.error and completion.error != completion.prompt.error:
        say_failed([completion.prompt], {0: completion.error})
    return completion


def run_loop(engine: Engine, lockstep: bool, idle_step: Callable[[], None],
             device: torch.device, on_finished: Callable[[list[Completion]], None], group=None,
             sync_every: int = 1, counters: Optional[LoopCounters] = None) -> LoopCounters:
    """`counters`, when given, is updated as the loop runs (a sampler thread reads it)."""
    counters = LoopCounters() if counters is None else counters
    # A prompt whose request cannot be made (distgen.engine.queue) is finished as an error completion.
    engine.on_failed(lambda completion: on_finished([said_failed(completion)]))
    start = time.perf_counter()
    step = 0
    while True:
        has_work = engine.has_work
        if lockstep:
            if step % sync_every == 0 and not any_rank_has_work(has_work, device, group):
                break
            step += 1
        elif not has_work:
            break
        if not has_work:
            idle_step()
            counters.idle_steps += 1
            continue
        forwards = engine.forwards
        finished = engine.step()
        # a pipelined engine's last step may only land the step before it (engine.core)
        counters.forward_steps += engine.forwards - forwards
        if finished:
            on_finished(finished)
    counters.seconds = time.perf_counter() - start
    return counters
