"""What one rank does: load and place the model, take its shard of prompts, generate."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from distgen.config import RunConfig
from distgen.dist_env import DistContext
from distgen.engine import Completion, build_engine
from distgen.layouts import DataGroups, get_layout
from distgen.layouts.base import full_param_bytes, resident_param_bytes
from distgen.loop import idle_forward, run_loop
from distgen.model_loading import ModelSource
from distgen.plan import assign_to_ranks, decode_order
from distgen.progress import ProgressLog
from distgen.prompts import Prompt
from distgen.records import RecordJournal, completion_record, error_record
from distgen.stats import RankStats, cuda_peaks_mib, peak_rss_mib, reset_peaks


@dataclass
class Job:
    """Everything checked and tokenized before any process group exists."""
    cfg: RunConfig
    prompts: list[Prompt]
    tokenizer: object
    token_ids: list[list[int]]
    fingerprint: str
    # Prompt indices that get an error record instead of a completion, with the reason.
    rejected: dict[int, str] = field(default_factory=dict)
    # Records an earlier run of this job finished, by prompt index; read by the coordinator only.
    finished: dict[int, dict] = field(default_factory=dict)
    # Prompt indices every rank skips: the coordinator's `finished`, shared once the group starts.
    skip: frozenset[int] = frozenset()

    @property
    def todo(self) -> list[int]:
        return [i for i in range(len(self.prompts)) if i not in self.skip and i not in self.rejected]

    def error_records(self) -> list[dict]:
        """Error records for rejected prompts an earlier run has not already written."""
        return [error_record(self.prompts[i], reason, len(self.token_ids[i]))
                for i, reason in sorted(self.rejected.items()) if i not in self.finished]


def resolve_eos_ids(configured: Sequence[int] | None, model, tokenizer) -> list[int]:
    if configured is not None:
        return list(configured)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model_eos is None:
        model_eos = tokenizer.eos_token_id
    if model_eos is None:
        return []
    return [model_eos] if isinstance(model_eos, int) else list(model_eos)


def rank_shard(job: Job, groups: DataGroups, rank: int) -> list[int]:
    """This rank's prompt indices in decoding order: prompts split over the layout's data-parallel
    groups, then over the ranks of a group. Every rank computes the same plan."""
    lengths = [len(ids) for ids in job.token_ids]
    todo = job.todo
    costs = [lengths[i] + job.prompts[i].budget(job.cfg.generation.max_new_tokens) for i in todo]
    group_todo = [todo[k] for k in assign_to_ranks(costs, len(groups.groups))[groups.index]]
    group_costs = [lengths[i] + job.prompts[i].budget(job.cfg.generation.max_new_tokens) for i in group_todo]
    mine = assign_to_ranks(group_costs, len(groups.members))[groups.members.index(rank)]
    return decode_order([group_todo[k] for k in mine], lengths)


def generate_shard(job: Job, ctx: DistContext) -> tuple[list[dict], RankStats]:
    """This rank's output records (also journaled to disk as they finish) and its stats."""
    wall_start = time.perf_counter()
    reset_peaks(ctx.device)
    layout = get_layout(job.cfg.layout.name)
    groups = layout.data_groups(job.cfg.layout, ctx)
    placed = layout.prepare(ModelSource(job.cfg.model, job.tokenizer, ctx.device), job.cfg.layout, ctx, groups)
    model, device = placed.model, placed.input_device
    param_bytes = placed.param_bytes or resident_param_bytes(model)
    load_seconds = time.perf_counter() - wall_start
    load_peak_rss = peak_rss_mib()

    pad_id = job.tokenizer.pad_token_id
    eos_ids = resolve_eos_ids(job.cfg.generation.eos_token_ids, model, job.tokenizer)
    mine = rank_shard(job, groups, ctx.rank)
    gen = job.cfg.generation
    engine = build_engine(model, [(job.prompts[i], job.token_ids[i]) for i in mine], gen, pad_id, eos_ids,
                          device, lockstep=placed.lockstep)
    if ctx.is_coordinator:
        print(f"distgen: engine: {engine.choice}", flush=True)
    records: list[dict] = []
    progress = ProgressLog(ctx.rank, len(mine), job.cfg.output.progress_every_s)
    with RecordJournal(Path(job.cfg.output.dir), job.fingerprint, ctx.rank) as journal:
        def keep(completions: list[Completion]) -> None:
            finished = [completion_record(c, job.tokenizer.decode(c.token_ids, skip_special_tokens=True))
                        for c in completions]
            journal.append(finished)
            records.extend(finished)
            progress.finished(len(finished), sum(r["completion_tokens"] for r in finished))

        try:
            counters = run_loop(engine, placed.lockstep, lambda: idle_forward(model, pad_id, device), device,
                                keep, group=placed.group, sync_every=gen.sync_every)
        except RuntimeError as err:
            if "timed out" not in str(err).lower() or not placed.lockstep:
                raise
            # Every rank still in the collective says this; the rank that stopped is the one that does not.
            peers = [r for r in groups.members if r != ctx.rank]
            raise RuntimeError(f"rank {ctx.rank}: a collective of layout={job.cfg.layout.name} timed out waiting "
                               f"for the other ranks of its group {peers}: one of them stopped joining forwards "
                               f"(the one whose log lacks this message)") from err
    engine.close()
    model_bytes = full_param_bytes(model)
    placed.release()
    allocated, reserved = cuda_peaks_mib(ctx.device)
    stats = RankStats(
        rank=ctx.rank, device=str(ctx.device), prompts=len(records),
        prompt_tokens=sum(r["prompt_tokens"] for r in records),
        generated_tokens=sum(r["completion_tokens"] for r in records),
        forward_steps=counters.forward_steps, idle_steps=counters.idle_steps,
        load_seconds=round(load_seconds, 3), generate_seconds=round(counters.seconds, 3),
        wall_seconds=round(time.perf_counter() - wall_start, 3), load_peak_rss_mib=round(load_peak_rss, 1),
        peak_rss_mib=round(peak_rss_mib(), 1),
        cuda_peak_allocated_mib=round(allocated, 1), cuda_peak_reserved_mib=round(reserved, 1),
        param_bytes=param_bytes, model_param_bytes=model_bytes, device_map=placed.device_map)
    return records, stats
