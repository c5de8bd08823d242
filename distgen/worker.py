"""What one rank does: load and place the model, take its shard of prompts, generate."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from distgen.config import RunConfig
from distgen.decode import Completion, RollingBatch
from distgen.dist_env import DistContext
from distgen.layouts import get_layout
from distgen.loop import idle_forward, run_loop
from distgen.model_loading import ModelSource
from distgen.plan import assign_to_ranks, decode_order
from distgen.progress import ProgressLog
from distgen.prompts import Prompt
from distgen.records import RecordJournal, completion_record
from distgen.stats import RankStats, cuda_peaks_mib, peak_rss_mib, reset_peaks


@dataclass
class Job:
    """Everything checked and tokenized before any process group exists."""
    cfg: RunConfig
    prompts: list[Prompt]
    tokenizer: object
    token_ids: list[list[int]]
    fingerprint: str
    # Records an earlier run of this job finished, by prompt index; read by the coordinator only.
    finished: dict[int, dict] = field(default_factory=dict)
    # Prompt indices every rank skips: the coordinator's `finished`, shared once the group starts.
    skip: frozenset[int] = frozenset()

    @property
    def todo(self) -> list[int]:
        return [i for i in range(len(self.prompts)) if i not in self.skip]


def resolve_eos_ids(configured: Sequence[int] | None, model, tokenizer) -> list[int]:
    if configured is not None:
        return list(configured)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model_eos is None:
        model_eos = tokenizer.eos_token_id
    if model_eos is None:
        return []
    return [model_eos] if isinstance(model_eos, int) else list(model_eos)


def rank_shard(job: Job, ctx: DistContext) -> list[int]:
    """This rank's prompt indices in decoding order; every rank computes the same plan."""
    lengths = [len(ids) for ids in job.token_ids]
    todo = job.todo
    costs = [lengths[i] + job.prompts[i].budget(job.cfg.generation.max_new_tokens) for i in todo]
    shards = assign_to_ranks(costs, ctx.world_size)
    return decode_order([todo[k] for k in shards[ctx.rank]], lengths)


def generate_shard(job: Job, ctx: DistContext) -> tuple[list[dict], RankStats]:
    """This rank's output records (also journaled to disk as they finish) and its stats."""
    wall_start = time.perf_counter()
    reset_peaks(ctx.device)
    layout = get_layout(job.cfg.layout.name)
    model = layout.prepare(ModelSource(job.cfg.model, job.tokenizer, ctx.device), job.cfg.layout, ctx)
    load_seconds = time.perf_counter() - wall_start
    load_peak_rss = peak_rss_mib()

    pad_id = job.tokenizer.pad_token_id
    eos_ids = resolve_eos_ids(job.cfg.generation.eos_token_ids, model, job.tokenizer)
    mine = rank_shard(job, ctx)
    gen = job.cfg.generation
    batch = RollingBatch([(job.prompts[i], job.token_ids[i]) for i in mine], gen, pad_id, eos_ids, ctx.device,
                         max_rows=gen.batch_size, refill=gen.continuous_batching)
    records: list[dict] = []
    progress = ProgressLog(ctx.rank, len(mine), job.cfg.output.progress_every_s)
    with RecordJournal(Path(job.cfg.output.dir), job.fingerprint, ctx.rank) as journal:
        def keep(completions: list[Completion]) -> None:
            finished = [completion_record(c, job.tokenizer.decode(c.token_ids, skip_special_tokens=True))
                        for c in completions]
            journal.append(finished)
            records.extend(finished)
            progress.finished(len(finished), sum(r["completion_tokens"] for r in finished))

        counters = run_loop(model, batch, layout.lockstep, lambda: idle_forward(model, pad_id, ctx.device),
                            ctx.device, keep)
    allocated, reserved = cuda_peaks_mib(ctx.device)
    stats = RankStats(
        rank=ctx.rank, device=str(ctx.device), prompts=len(records),
        prompt_tokens=sum(r["prompt_tokens"] for r in records),
        generated_tokens=sum(r["completion_tokens"] for r in records),
        forward_steps=counters.forward_steps, idle_steps=counters.idle_steps,
        load_seconds=round(load_seconds, 3), generate_seconds=round(counters.seconds, 3),
        wall_seconds=round(time.perf_counter() - wall_start, 3), load_peak_rss_mib=round(load_peak_rss, 1),
        peak_rss_mib=round(peak_rss_mib(), 1),
        cuda_peak_allocated_mib=round(allocated, 1), cuda_peak_reserved_mib=round(reserved, 1))
    return records, stats
