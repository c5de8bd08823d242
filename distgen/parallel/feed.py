"""What each rank reads and tokenizes: a slice of the dataset for the shared length table the
plan is made from, then only its own prompts, a chunk at a time, as batch rows free up."""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from distgen.common.files import atomic_file
from distgen.parallel.env import DistContext
from distgen.inputs.keys import key_halves, record_key
from distgen.inputs.source import PromptSource
from distgen.inputs.records import Prompt
from distgen.inputs.screening import ContextLimit, Verdict, adapter_index, screen_prompt, too_long_failure

logger = logging.getLogger(__name__)

CHUNK = 1024
# Rows of the length table; KEY_HIGH and KEY_LOW: each record's key (distgen/inputs/keys.py) in two halves;
# ADAPTER: its LoRA adapter (screening.adapter_index: 0 the base model); SAMPLES: the record's own n (0: generation.n).
LENGTH, BUDGET, SCREEN, KEY_HIGH, KEY_LOW, ADAPTER, SAMPLES = range(7)
ROWS = 7


@dataclass(frozen=True)
class Screening:
    """What decides whether a prompt runs: the model's context, dataset.too_long, and the adapters a record may name."""
    limit: ContextLimit = ContextLimit(None)
    too_long: str = "error_record"
    default_budget: int = 1
    # model.lora's adapter names where records choose one (None: they may not)
    adapters: Optional[tuple[str, ...]] = None

    def __call__(self, prompt: Prompt, length: int):
        return screen_prompt(prompt, length, self.limit, self.too_long, self.default_budget, self.adapters)


def encode(tokenizer, texts: list[str], templated: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=not templated)["input_ids"]


def encode_each(tokenizer, prompts: Sequence[Prompt], templated: bool) -> tuple[list[list[int]], dict[int, str]]:
    """One prompt at a time, after a batch failed: (ids, {position: why}) for the prompts the tokenizer fails on."""
    ids, failed = [], {}
    for k, prompt in enumerate(prompts):
        try:
            ids.append(encode(tokenizer, [prompt.text], templated)[0])
        except Exception as err:  # only this prompt's text went in: attributable to its record
            ids.append([])
            failed[k] = f"the prompt could not be tokenized: {type(err).__name__}: {err}"
    return ids, failed


def tokenize_checked(tokenizer, prompts: Sequence[Prompt]) -> tuple[list[list[int]], dict[int, str]]:
    """A chat-rendered prompt already holds its special tokens; a plain one gets the tokenizer's.
    A prompt that tokenizes to nothing gets no tokens (screening gives it an error record), and so does
    one the tokenizer fails on: (ids, {position in `prompts`: why it failed})."""
    ids: list[list[int]] = [[] for _ in prompts]
    failed: dict[int, str] = {}
    for templated in (False, True):
        rows = [k for k, p in enumerate(prompts) if p.templated == templated]
        if not rows:
            continue
        try:
            encoded, bad = encode(tokenizer, [prompts[k].text for k in rows], templated), {}
        except Exception:  # the batch failed: find the prompt(s) it failed on
            encoded, bad = encode_each(tokenizer, [prompts[k] for k in rows], templated)
        for k, row_ids in zip(rows, encoded):
            ids[k] = row_ids
        failed.update({rows[k]: why for k, why in bad.items()})
    return ids, failed


def tokenize(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    return tokenize_checked(tokenizer, prompts)[0]


def say_failed(prompts: Sequence[Prompt], failed: dict[int, str]) -> None:
    for k, why in failed.items():
        logger.warning("record %r (index %d): %s; it gets an error record", prompts[k].id, prompts[k].index, why)


def slice_bounds(count: int, world_size: int, rank: int) -> tuple[int, int]:
    per = -(-count // world_size)
    return min(rank * per, count), min((rank + 1) * per, count)


def measure(source: PromptSource, tokenizer, start: int, stop: int, screening: Screening) -> np.ndarray:
    """(ROWS, stop - start) int32: prompt token counts as run (after truncate_left), per-record
    budgets (0: the default), each prompt's screening verdict (a Verdict), its key, its adapter and its
    record's n (0: the default)."""
    table = np.zeros((ROWS, stop - start), dtype=np.int32)
    for at in range(start, stop, CHUNK):
        prompts = source.prompts(range(at, min(at + CHUNK, stop)))
        ids, failed = tokenize_checked(tokenizer, prompts)
        say_failed(prompts, failed)
        lengths = [len(row) for row in ids]
        screens = [screening(p, n) for p, n in zip(prompts, lengths)]
        part = slice(at - start, at - start + len(prompts))
        table[LENGTH, part] = lengths
        # A budget fits int32 (records.OVERRIDES checks its range; a bad one is dropped for an error record).
        table[BUDGET, part] = [p.max_new_tokens or 0 for p in prompts]
        table[SAMPLES, part] = [p.n or 0 for p in prompts]  # records.OVERRIDES bounds it by MAX_SAMPLES
        table[SCREEN, part] = [s.verdict for s in screens]
        table[[KEY_HIGH, KEY_LOW], part] = np.asarray([key_halves(record_key(p)) for p in prompts], np.int32).T
        table[ADAPTER, part] = [adapter_index(p.lora, screening.adapters) for p in prompts]
        kept = [k for k, s in enumerate(screens) if s.keep is not None]
        table[LENGTH, [part.start + k for k in kept]] = [screens[k].keep for k in kept]
    return table


def broadcast_flag(value: bool, ctx: DistContext) -> bool:
    flag = torch.tensor([1 if value else 0], dtype=torch.int32, device=ctx.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def cached_table(cache: Path, count: int) -> Optional[np.ndarray]:
    """The length table an earlier run of the job kept, if it has this table's shape."""
    try:
        table = np.load(cache)
    except (OSError, ValueError):
        return None
    return table if table.shape == (ROWS, count) and table.dtype == np.int32 else None


def shared_lengths(source: PromptSource, tokenizer, ctx: DistContext, cache: Optional[Path],
                   screening: Screening = Screening()) -> np.ndarray:
    """Every prompt's token count and budget, on every rank. Each rank measures one slice and
    the slices are all-gathered; rank 0 keeps the table in `cache` (keyed by the job
    fingerprint), and a later run of the job broadcasts it instead of measuring again.
    Returns the (ROWS, prompts) table: LENGTH, BUDGET, SCREEN, KEY_HIGH, KEY_LOW, ADAPTER and SAMPLES rows."""
    count = len(source)
    kept = cached_table(cache, count) if ctx.is_coordinator and cache is not None else None
    if broadcast_flag(kept is not None, ctx):
        table = torch.from_numpy(kept) if ctx.is_coordinator else torch.zeros((ROWS, count), dtype=torch.int32)
        table = table.to(ctx.device)
        dist.broadcast(table, src=0)
        table = table.cpu().numpy()
    else:
        start, stop = slice_bounds(count, ctx.world_size, ctx.rank)
        per = -(-count // ctx.world_size)
        mine = torch.zeros((ROWS, per), dtype=torch.int32)
        mine[:, :stop - start] = torch.from_numpy(measure(source, tokenizer, start, stop, screening))
        parts = [torch.zeros_like(mine, device=ctx.device) for _ in range(ctx.world_size)]
        dist.all_gather(parts, mine.to(ctx.device))
        table = torch.cat([p.cpu() for p in parts], dim=1)[:, :count].numpy()
        if ctx.is_coordinator and cache is not None:
            with atomic_file(cache, "wb") as out:
                np.save(out, table)
    return table


def check_fits(table: np.ndarray, source: PromptSource, tokenizer, screening: Screening) -> None:
    """dataset.too_long=fail: a ConfigError naming the first prompts that do not fit (same on every rank)."""
    failed = np.flatnonzero(table[SCREEN] == Verdict.FAILS)
    if len(failed):
        prompts = source.prompts(failed[:5])
        lengths = [len(ids) for ids in tokenize(tokenizer, prompts)]
        raise too_long_failure([f"id {p.id!r}: {screening(p, n).reason}" for p, n in zip(prompts, lengths)],
                               len(failed))


class PromptFeed:
    """A rank's prompts in decoding order, read and tokenized CHUNK at a time as they are taken:
    the batch queue holds at most one chunk of prompts, never the rank's whole share."""

    def __init__(self, source: PromptSource, order: Sequence[int], tokenizer, chunk: int = CHUNK,
                 lengths: Optional[np.ndarray] = None):
        """`lengths`: the table's token count per prompt; a longer prompt keeps its last tokens (truncate_left)."""
        self.source, self.tokenizer, self.chunk, self.lengths = source, tokenizer, chunk, lengths
        self.order = np.asarray(order, dtype=np.int64)
        self.taken = 0  # prompts of `order` read so far
        self.ready: deque[tuple[Prompt, list[int]]] = deque()

    def __len__(self) -> int:
        return len(self.order) - self.taken + len(self.ready)

    def __bool__(self) -> bool:
        return len(self) > 0

    def popleft(self) -> tuple[Prompt, list[int]]:
        if not self.ready:
            indices = self.order[self.taken:self.taken + self.chunk]
            self.taken += len(indices)
            prompts = self.source.prompts(indices)
            ids, failed = tokenize_checked(self.tokenizer, prompts)
            # Measured fine before (else screened out): fails its request now (distgen.engine.build.make_request).
            prompts = [replace(p, error=failed[k]) if k in failed else p for k, p in enumerate(prompts)]
            if self.lengths is not None:
                ids = [row[len(row) - int(self.lengths[p.index]):] for p, row in zip(prompts, ids)]
            self.ready.extend(zip(prompts, ids))
        return self.ready.popleft()
